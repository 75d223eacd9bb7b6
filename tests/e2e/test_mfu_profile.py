"""MFU in every record and train.profile through the real CLI, in every placement."""

import json
import math

import pytest

from distalex.config import load_config
from distalex.model.alexnet import spec_from_config
from distalex.model.flops import training_flops

from helpers import QUICK, SPLIT_MODES, cli_env, metrics, png_size, run_cli, summary

PROFILED = 3
STEPS = 8
ARGS = [*QUICK, f"train.max_steps={STEPS}", "train.log_every=2", f"train.profile={PROFILED}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mfu")
    env = cli_env(XDG_CACHE_HOME=str(root / "cache"))
    out = {}
    for mode, (nprocs, args) in SPLIT_MODES.items():
        extra = ["train.peak_tflops=0.05"] if mode == "model-parallel" else []
        out[mode] = root / mode
        out[mode + "_proc"] = run_cli(*ARGS, *args, *extra, f"train.output_dir={out[mode]}", nprocs=nprocs, env=env)
    return out


@pytest.mark.parametrize("mode", sorted(SPLIT_MODES))
def test_every_record_carries_tflops_and_mfu(runs, mode):
    s = summary(runs[mode])
    cfg = load_config(QUICK[1], QUICK[2:], split_mode=mode)
    assert s["flops_per_example"] == training_flops(spec_from_config(cfg))
    peak = s["peak_tflops_per_process"]
    assert peak > 0
    if mode == "model-parallel":
        run = "bf16" if s["mixed_precision"] == "bf16" else "fp32"
        assert peak == 0.05 and s["peak_source"] == f"train.peak_tflops, for a {run} run"
        assert "peak_precision" not in s  # the user's figure, of whatever arithmetic they meant
    else:
        # The peak of the precision the run trains in ("auto" resolved), at its thread count.
        assert s["peak_precision"] == ("bf16" if s["mixed_precision"] == "bf16" else "fp32")
        assert s["peak_source"].startswith(f"measured {s['peak_precision']} matmul on ")
        assert f", {s['threads']} thread" in s["peak_source"]
    rows = metrics(runs[mode])
    assert len([r for r in rows if "test_acc" not in r]) == STEPS // 2 and any("test_acc" in r for r in rows)
    for r in [*rows, s]:
        tflops = r["examples_per_sec"] * s["flops_per_example"] / 1e12
        assert math.isclose(r["tflops_per_sec"], tflops, rel_tol=1e-9), r
        assert math.isclose(r["mfu"], tflops / (s["world_size"] * peak), rel_tol=1e-9), r
    printed = [ln for ln in runs[mode + "_proc"].stdout.splitlines() if ln.startswith("distalex: peak")]
    assert len(printed) == 1 and f"{peak:.4g} TFLOP/s" in printed[0]


@pytest.mark.parametrize("mode", sorted(SPLIT_MODES))
def test_profile_is_written_for_every_process(runs, mode):
    prof = runs[mode] / "profile"
    nprocs = SPLIT_MODES[mode][0]
    s = json.loads((prof / "summary.json").read_text())
    assert s["steps"] == PROFILED and [r["rank"] for r in s["ranks"]] == list(range(nprocs))
    # Every process runs every layer, except pipeline's, each of which runs its stage's.
    each = ("optimizer",) if mode == "pipeline" else ("conv2", "fc6", "data", "optimizer")
    seen = set()
    for r in s["ranks"]:
        ms = r["ms_per_step"]
        assert sum(ms.values()) == pytest.approx(r["step_ms"], rel=1e-3)
        assert all(ms.get(g, 0) > 0 for g in each), ms
        seen |= {g for g, v in ms.items() if v > 0}
    assert {"conv2", "fc6", "data", "optimizer"} <= seen
    for r in s["ranks"]:
        ms = r["ms_per_step"]
        # Communication shows where the placement has it, and only there.
        assert (ms.get("comm:tower", 0) > 0) == (mode == "model-parallel"), ms
        assert (ms.get("comm:hybrid", 0) > 0) == (mode == "hybrid"), ms
        # DDP's all-reduce: of every parameter in ddp, of the replicated convolutions in hybrid.
        assert (ms.get("comm:ddp", 0) > 0) == (mode in ("ddp", "hybrid")), ms
        # FSDP's all-gathers and reduce-scatters (FSDP2's own labels).
        assert (ms.get("comm:fsdp", 0) > 0) == (mode == "fsdp"), ms
        # The stage boundaries' sends and receives, and the step figures' broadcast.
        assert (ms.get("comm:pipeline", 0) > 0) == (mode == "pipeline"), ms
    traces = ["trace.json"] + [f"trace_rank{r}.json" for r in range(1, nprocs)]
    for name in traces:
        events = json.loads((prof / name).read_text())["traceEvents"]
        assert sum(e.get("name", "").startswith("profiled_step#") for e in events) == PROFILED
    _, width, height = png_size(prof / "profile.png")
    assert width > 300 and height > 100
    assert f"profile of {PROFILED} steps" in runs[mode + "_proc"].stdout


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_profile_and_mfu_on_a_gpu(tmp_path):
    """The device-time profile and the datasheet peak (their logic is tested on CPU in
    tests/unit/test_profiling.py and tests/unit/test_peak.py)."""
    import torch

    from distalex.telemetry.peak import gpu_peak

    env = cli_env()
    env.pop("CUDA_VISIBLE_DEVICES")
    run_cli(*ARGS, "--split-mode", "single", f"train.output_dir={tmp_path}", env=env)
    s = summary(tmp_path)
    prof = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert prof["measure"] == "device time per category" and prof["steps"] == PROFILED
    ms = prof["ranks"][0]["ms_per_step"]
    assert all(ms.get(g, 0) > 0 for g in ("conv2", "fc6", "optimizer")), ms
    known = gpu_peak(torch.cuda.get_device_name(0), s["mixed_precision"])
    assert ("mfu" in s) == (known is not None)
