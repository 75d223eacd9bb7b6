"""bench/bench.py's arithmetic without running a benchmark: per-step times from a
run's records, and the TFLOP/s and MFU columns."""

import importlib.util
import json
import math

import pytest

from distalex.model.alexnet import AlexNetSpec
from distalex.model.flops import training_flops

from helpers import ROOT

spec = importlib.util.spec_from_file_location("distalex_bench", ROOT / "bench" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_step_times_from_the_cumulative_rates(tmp_path):
    # Steps of 2 s, then 1 s, then 1 s at batch 128: cumulative examples/sec after each step.
    ends = [2.0, 3.0, 4.0]
    rows = [
        {"step": k + 1, "epoch": 0.1, "loss": 1.0, "examples_per_sec": (k + 1) * 128 / t} for k, t in enumerate(ends)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"global_batch": 128, "examples_per_sec": 96.0}))
    r = bench.read_distalex(tmp_path)
    assert r["step_times_s"] == [2.0, 1.0, 1.0]
    assert r["steady"] == pytest.approx(2 * 128 / 2.0)  # the steps after the first


def test_mfu_columns_use_one_peak_per_precision_and_thread_count(monkeypatch):
    peaks = {("no", 2): 0.2, ("no", 1): 0.1, ("bf16", 2): 0.4}
    calls = []

    def fake_peak(device_peak, precision, threads):
        calls.append((precision, threads))
        return peaks[precision, threads]

    monkeypatch.setattr(bench, "_peak", fake_peak)
    rows = {
        "a": {"train": 30.0, "steady": 31.0, "processes": 1, "threads_per_process": 2, "mixed_precision": "no"},
        "b": {"train": 60.0, "steady": 62.0, "processes": 1, "threads_per_process": 2, "mixed_precision": "bf16",
              "flops_per_example": 5_000_000_000},
        "c": {"train": 50.0, "steady": None, "processes": 2, "threads_per_process": 1, "mixed_precision": "no",
              "flops_per_example": 5_000_000_000},
        "z": {"error": "failed", "processes": 1, "threads_per_process": 2},
    }  # fmt: skip
    bench.add_mfu(rows, {"image_size": 224})
    seed = training_flops(AlexNetSpec(image_size=224))  # the baseline row is the d2l network
    assert math.isclose(rows["a"]["tflops_per_sec"], 30.0 * seed / 1e12)
    assert math.isclose(rows["a"]["mfu"], 30.0 * seed / 1e12 / 0.2)
    assert math.isclose(rows["a"]["mfu_steady"], 31.0 * seed / 1e12 / 0.2)
    assert math.isclose(rows["b"]["mfu"], 0.3 / 0.4)
    assert math.isclose(rows["c"]["mfu"], 0.25 / (2 * 0.1)) and "mfu_steady" not in rows["c"]
    assert "mfu" not in rows["z"]
    assert sorted(calls) == sorted(peaks)  # each peak once


@pytest.mark.parametrize("trains", ["bf16", "no"])
def test_the_benchmark_and_the_runs_own_mfu_agree(monkeypatch, trains):
    """A row's MFU (bench.add_mfu, from the summary's resolved precision and thread count) equals
    the one the run logged itself (telemetry/mfu.py, which compare.py shows): one peak for both."""
    from types import SimpleNamespace

    import torch

    from distalex.config import load_config
    from distalex.telemetry import peak as peak_mod
    from distalex.telemetry.mfu import for_run

    rates = {"bf16": 0.4, "no": 0.1}
    monkeypatch.setattr(peak_mod, "cpu_peak", lambda precision: peak_mod.Peak(rates[precision], "test", precision))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = AlexNetSpec(width=0.125, image_size=67)
    placement = SimpleNamespace(device=torch.device("cpu"), spec=spec, mesh=SimpleNamespace(world_size=1))
    util, _ = for_run(load_config(None, []).train, placement, trains)  # the config says auto
    logged = util.figures(100.0)["mfu"]
    row = {"train": 100.0, "processes": 1, "threads_per_process": torch.get_num_threads()}
    row.update(mixed_precision=trains, flops_per_example=util.flops_per_example)  # what bench reads back
    bench.add_mfu({"b": row}, {"image_size": 67})
    assert math.isclose(row["mfu"], logged, rel_tol=1e-12)


ip_spec = importlib.util.spec_from_file_location("input_pipeline", ROOT / "bench" / "input_pipeline.py")
input_pipeline = importlib.util.module_from_spec(ip_spec)
ip_spec.loader.exec_module(input_pipeline)


def test_input_pipeline_bench_runs_every_row_and_writes_json(tmp_path):
    out = tmp_path / "ip.json"
    args = ["--images", "8", "--batch", "4", "--image", "24", "--resize", "28", "--rounds", "1", "--towers", "0"]
    assert input_pipeline.main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    sets = result["samples_per_sec_per_core"]
    assert any(name.startswith("generated 500x375") for name in sets)
    for rows in sets.values():
        assert sorted(rows) == sorted(
            ["decode only (every row pays it)", "torchvision RandomResizedCrop", "torchvision Resize+RandomCrop",
             "distalex float (before)", "distalex uint8 (now)", "distalex uint8, resampler=torch",
             "distalex uint8, CPU side only", "distalex decode=gpu, CPU side only"]
        )  # fmt: skip
        assert all(v > 0 and math.isfinite(v) for v in rows.values())


def test_generated_images_have_a_natural_spectrum():
    """1/f amplitude: the power in a frequency band falls ~ f^-2 (log-log slope about -2), not
    flat like the noise the header-check bench re-encodes."""
    import numpy as np

    img = input_pipeline.natural_image(np.random.default_rng(0), 256, 256).astype(float).mean(-1)
    power = np.abs(np.fft.fft2(img - img.mean())) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(256), np.fft.fftfreq(256)))
    bands = [(0.02, 0.04), (0.08, 0.16)]
    p = [power[(f >= lo) & (f < hi)].mean() for lo, hi in bands]
    slope = np.log(p[1] / p[0]) / np.log(4)
    assert -2.6 < slope < -1.4, slope
