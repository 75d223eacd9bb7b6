"""The peak MFU is measured against (distalex/telemetry/peak.py) and the figures (distalex/telemetry/mfu.py)."""

import json
import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distalex.telemetry import peak as peak_mod
from distalex.telemetry.mfu import Utilization
from distalex.telemetry.peak import cache_path, cpu_peak, device_peak, gpu_peak, measure_matmul_tflops


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """The shared test machine is often busy; the cache tests need it idle (load average 0)."""
    monkeypatch.setattr(peak_mod.os, "getloadavg", lambda: (0.0, 0.0, 0.0))


@pytest.mark.parametrize(
    ("name", "precision", "card", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.5),
        ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "fp16", "H100 NVL", 835.5),
        ("NVIDIA H200", "bf16", "H200 SXM", 989.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "no", "A100", 156.0),  # fp32 run: TF32 convolutions
        ("NVIDIA L4", "bf16", "L4", 121.0),
        ("NVIDIA L40S", "bf16", "L40S", 362.1),  # not the L4
        ("NVIDIA GeForce RTX 4090", "fp16", "RTX 4090", 165.2),
    ],
)
def test_datasheet_peaks_by_device_name(name, precision, card, tflops):
    peak = gpu_peak(name, precision)
    assert peak is not None and peak.tflops == tflops and card in peak.source


def test_fp32_without_tf32_uses_the_cuda_core_peak():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "no", tf32=False).tflops == 67.0
    assert "fp32" in gpu_peak("NVIDIA H100 80GB HBM3", "no", tf32=False).source


def test_unknown_card_has_no_peak_and_says_so(monkeypatch):
    assert gpu_peak("NVIDIA GeForce GTX 1080", "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    peak, line = device_peak(torch.device("cuda", 0), "bf16")
    assert peak is None
    assert "GTX 1080" in line and "MFU omitted" in line and "train.peak_tflops" in line and "\n" not in line


def test_override_wins(monkeypatch):
    monkeypatch.setattr(peak_mod, "cpu_peak", lambda *a, **k: pytest.fail("measured despite the override"))
    peak, line = device_peak(torch.device("cpu"), "bf16", override=2.5)
    assert peak.tflops == 2.5 and "train.peak_tflops" in line


def test_probe_takes_under_a_second_and_finds_a_rate():
    t0 = time.perf_counter()
    tflops = measure_matmul_tflops(torch.float32)
    assert time.perf_counter() - t0 < 1.0
    assert 0 < tflops < 1000


def test_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "peak.json"
    first = cpu_peak("no", threads=1, path=path)
    assert "just now" in first.source and first.tflops > 0
    entries = json.loads(path.read_text())
    (key,) = entries
    assert "fp32" in key and "1 threads" in key and entries[key] == first.tflops
    monkeypatch.setattr(peak_mod, "measure_matmul_tflops", lambda *a, **k: pytest.fail("measured again"))
    second = cpu_peak("no", threads=1, path=path)
    assert second.tflops == first.tflops and "cached" in second.source and "just now" not in second.source


def test_each_precision_and_thread_count_has_its_own_entry(tmp_path, monkeypatch):
    path = tmp_path / "peak.json"
    rates = iter([1.0, 2.0, 3.0])
    monkeypatch.setattr(peak_mod, "measure_matmul_tflops", lambda *a, **k: next(rates))
    assert [cpu_peak(p, threads=t, path=path).tflops for p, t in (("no", 1), ("bf16", 1), ("no", 2))] == [1, 2, 3]
    assert cpu_peak("bf16", threads=1, path=path).tflops == 2.0
    assert len(json.loads(path.read_text())) == 3


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[1, 2]", b'{"x": "fast"}', b"\xff\xfe", b'{"k": NaN}', b'{"k": -1}', b'{"k": true}'],
)
def test_a_broken_cache_is_measured_again_and_rewritten(tmp_path, monkeypatch, content):
    path = tmp_path / "peak.json"
    path.write_bytes(content)
    monkeypatch.setattr(peak_mod, "measure_matmul_tflops", lambda *a, **k: 0.25)
    assert cpu_peak("no", threads=1, path=path).tflops == 0.25
    assert list(json.loads(path.read_text()).values()) == [0.25]


def test_an_unwritable_cache_still_gives_a_peak(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(peak_mod, "measure_matmul_tflops", lambda *a, **k: 0.5)
    peak = cpu_peak("no", threads=1, path=tmp_path / "file" / "peak.json")
    assert peak.tflops == 0.5 and "not cached" in peak.source


def test_a_probe_on_a_busy_machine_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(peak_mod.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(peak_mod, "measure_matmul_tflops", lambda *a, **k: 0.5)
    path = tmp_path / "peak.json"
    peak = cpu_peak("no", threads=1, path=path)
    assert peak.tflops == 0.5 and "not cached" in peak.source and "load average 64.0" in peak.source
    assert not path.exists()


def test_cache_path_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_path() == tmp_path / "distalex" / "peak.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_path().parts[-3:] == (".cache", "distalex", "peak.json")


def test_utilization_figures():
    util = Utilization(flops_per_example=5_000_000_000, processes=2, peak_tflops=0.4, peak_source="test")
    fig = util.figures(100.0)
    assert math.isclose(fig["tflops_per_sec"], 0.5)
    assert math.isclose(fig["mfu"], 0.5 / 0.8)
    assert Utilization(5_000_000_000, 2).figures(100.0) == {"tflops_per_sec": 0.5}
    assert "peak_tflops_per_process" not in Utilization(1, 1).run_info()


# ------------------------------------------------------- the peak of the precision a run trains in


@pytest.mark.parametrize(("native", "trains", "peak_precision"), [(True, "bf16", "bf16"), (False, "no", "fp32")])
def test_an_auto_run_is_measured_against_the_peak_of_the_precision_it_trains_in(
    tmp_path, monkeypatch, native, trains, peak_precision
):
    """train.mixed_precision=auto on a CPU whose capabilities say bf16 (or not): the run as
    build_run puts it together looks its peak up at the precision auto resolved to, not fp32's."""
    from accelerate.state import AcceleratorState

    from distalex.config import load_config
    from distalex.runtime import precision
    from distalex.training.build import build_run

    from helpers import TINY

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rates = {torch.bfloat16: 0.4, torch.float32: 0.1}  # distinct, so the figure shows which was taken
    monkeypatch.setattr(peak_mod, "measure_matmul_tflops", lambda dtype, *a, **k: rates[dtype])
    cfg = load_config(
        TINY,
        [
            "data.name=synthetic",
            "data.synthetic_train_size=64",
            "data.synthetic_test_size=32",
            "train.batch_size=32",
            "tracking.wandb=false",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.train.mixed_precision == "auto"
    before = torch.get_num_threads()
    AcceleratorState._reset_state(True)
    run = build_run(cfg)
    try:
        info = run.run_info
    finally:
        run.close()
        AcceleratorState._reset_state(True)
        torch.set_num_threads(before)
    assert info["mixed_precision"] == trains
    assert info["peak_precision"] == peak_precision
    assert info["peak_tflops_per_process"] == rates[torch.bfloat16 if trains == "bf16" else torch.float32]
    assert info["peak_source"].startswith(f"measured {peak_precision} matmul on ")
    assert f", {info['threads']} thread" in info["peak_source"]  # measured at the count the run trains with


@settings(max_examples=60, deadline=None)
@given(
    precision=st.sampled_from(["no", "bf16", "fp16"]),
    card=st.sampled_from([None, *[card for _, card, _ in peak_mod.GPU_PEAKS]]),  # None: a CPU
    tf32=st.booleans(),
)
def test_the_peak_is_of_the_precision_the_process_trains_in(precision, card, tf32):
    """Any resolved precision on any known device: the peak's precision is that one (tf32 or fp32
    for an fp32 GPU run, fp32 for a CPU's fp32 run) and its source says so."""
    from types import SimpleNamespace

    from distalex.config import load_config
    from distalex.model.alexnet import AlexNetSpec
    from distalex.telemetry.mfu import for_run

    train = load_config(None, []).train
    placement = SimpleNamespace(
        device=torch.device("cpu") if card is None else torch.device("cuda", 0),
        spec=AlexNetSpec(width=0.125, image_size=67),
        mesh=SimpleNamespace(world_size=1),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "get_device_name", lambda device=None: card)
        mp.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        # The real cpu_peak, measuring nothing and caching nowhere.
        mp.setattr(peak_mod, "measure_matmul_tflops", lambda *a, **k: 1.0)
        mp.setattr(peak_mod, "_read_cache", lambda path: ({}, None))
        mp.setattr(peak_mod, "write_json", lambda *a, **k: None)
        util, line = for_run(train, placement, precision)
    if card is None:
        expected = "bf16" if precision == "bf16" else "fp32"
    else:
        expected = precision if precision != "no" else ("tf32" if tf32 else "fp32")
    assert util.peak_precision == expected
    assert expected in util.peak_source and expected in line


def test_an_unresolved_auto_has_no_peak():
    """The config's "auto" is not a precision a process trains in: looking its peak up is refused."""
    with pytest.raises(ValueError, match="'auto'"):
        device_peak(torch.device("cpu"), "auto")
    with pytest.raises(ValueError, match="'auto'"):
        device_peak(torch.device("cpu"), "auto", override=1.0)


def test_an_override_names_the_precision_of_the_run():
    peak, _ = device_peak(torch.device("cpu"), "no", override=2.5)
    assert peak.source == "train.peak_tflops, for a fp32 run" and peak.precision is None
