"""Mixed precision: what ``auto`` resolves to (decision table, with mocked devices) and the
fp16 optimizer step through accelerate's optimizer wrapper (one process, CPU GradScaler).
The cross-rank skip decision is tested with gloo processes in tests/distributed/test_towers.py."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from distalex.config import load_config
from distalex.runtime import precision


@pytest.fixture
def no_launcher_flag(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def fake_gpus(monkeypatch, capabilities: dict, emulation: bool = True):
    """CUDA devices with the given (major, minor) compute capabilities.  ``emulation``:
    a bf16 tensor can be created on every one of them (true of V100/T4 under CUDA 11+),
    which is what ``torch.cuda.is_bf16_supported()`` counts by default."""
    current = {"index": 0}

    @contextlib.contextmanager
    def device(d):
        old, current["index"] = current["index"], torch.device(d).index
        try:
            yield
        finally:
            current["index"] = old

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(major=capabilities[i][0], minor=capabilities[i][1]),
    )
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda i: emulation)


def fake_cpu(monkeypatch, machine="x86_64", avx512_bf16=False, amx=False, onednn_bf16=False):
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 0), "no"), ((7, 5), "no"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")],
    ids=["V100", "T4", "A100", "A10", "H100"],
)
def test_auto_on_gpus_uses_native_bf16_only(monkeypatch, no_launcher_flag, capability, expected):
    fake_gpus(monkeypatch, {0: capability})
    assert torch.cuda.is_bf16_supported()  # the emulation-counting default says yes on every one
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_auto_probes_the_ranks_own_gpu_not_cuda0(monkeypatch, no_launcher_flag):
    fake_gpus(monkeypatch, {0: (8, 0), 1: (7, 5)})  # a mixed machine: A100 + T4
    assert precision.resolve_precision("auto", torch.device("cuda", 1)) == "no"
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert torch.cuda.current_device() == 0  # the probe left the current device alone


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        (dict(avx512_bf16=True, onednn_bf16=True), "bf16"),  # e.g. AMD Zen 4, Intel Cooper Lake
        (dict(amx=True, onednn_bf16=True), "bf16"),  # Intel Sapphire Rapids
        (dict(onednn_bf16=True), "no"),  # plain AVX512 (Skylake-SP): oneDNN emulates bf16
        (dict(), "no"),  # AVX2 only
        (dict(machine="aarch64", onednn_bf16=True), "bf16"),  # Arm with the BF16 extension
        (dict(machine="aarch64"), "no"),
    ],
    ids=["avx512bf16", "amx", "avx512-emulated", "avx2", "arm-bf16", "arm"],
)
def test_auto_on_cpus_uses_native_bf16_only(monkeypatch, no_launcher_flag, cpu, expected):
    fake_cpu(monkeypatch, **cpu)
    assert precision.resolve_precision("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("launcher", ["bf16", "fp16"])
def test_launcher_flag_wins_over_the_device(monkeypatch, launcher):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)  # accelerate launch --mixed_precision
    fake_cpu(monkeypatch)
    assert precision.resolve_precision("auto", torch.device("cpu")) == launcher
    fake_gpus(monkeypatch, {0: (7, 0)})
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) == launcher


def test_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    fake_gpus(monkeypatch, {0: (9, 0)})
    for value in ("no", "bf16", "fp16"):
        assert precision.resolve_precision(value, torch.device("cuda", 0)) == value


def test_make_accelerator_resolves_auto_on_the_device_it_set(monkeypatch, no_launcher_flag):
    """Rank 1 of a machine whose cuda:0 has bf16 and cuda:1 does not: the precision handed to
    accelerate is decided on cuda:1, the device the process state set for this rank."""
    import accelerate

    from distalex.parallel import launch
    from distalex.parallel.ddp import DDPOptions

    fake_gpus(monkeypatch, {0: (8, 0), 1: (7, 0)})
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    made = {}

    class FakeState:
        def __init__(self, cpu=False, **kwargs):
            made["state"] = dict(cpu=cpu, **kwargs)
            self.device = torch.device("cuda", 1)

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: made.setdefault("accelerator", kwargs))
    cfg = load_config(None, ["train.timeout_s=42"])
    assert cfg.train.mixed_precision == "auto"
    launch.make_accelerator(cfg.train, DDPOptions(), launch.group_timeout(cfg.train))
    assert made["accelerator"]["mixed_precision"] == "no"
    assert made["state"]["timeout"].total_seconds() == 42 and made["state"]["cpu"] is False


def test_fp16_step_through_accelerates_wrapper_skips_on_overflow_only():
    """The product's optimizer is accelerate's wrapper; the scaler keys its bookkeeping by
    the wrapped optimizer.  An overflow skips the step and halves the scale; a clean step steps."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    try:
        Accelerator(cpu=True)  # the wrapper needs accelerate's process state; a CPU one has no scaler
        w = torch.nn.Parameter(torch.ones(3))
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1000)
        opt = AcceleratedOptimizer(torch.optim.SGD([w], lr=0.5), device_placement=False, scaler=scaler)
        scaler.scale((w * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
        w.grad[1] = float("inf")
        precision.optimizer_step(opt, scaler)
        assert torch.equal(w.detach(), torch.ones(3)) and scaler.get_scale() == 4.0
        opt.zero_grad()
        scaler.scale((w * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
        precision.optimizer_step(opt, scaler)
        assert torch.allclose(w.detach(), torch.tensor([0.5, 0.0, -0.5])) and scaler.get_scale() == 4.0
    finally:
        AcceleratorState._reset_state(True)


def test_step_without_a_scaler_is_the_optimizers():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=1.0)
    w.sum().backward()
    precision.optimizer_step(opt, None)
    assert torch.equal(w.detach(), torch.zeros(2))
