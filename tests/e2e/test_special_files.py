"""Special files where distalex expects a regular file: a FIFO (which blocks a plain
``open`` for ever), at every place the CLI reads one, ends in one line -- a refusal (exit 2)
naming the file, or, where the file is optional (the peak cache, a stray entry in
``checkpoints/``), one line saying it is ignored.  Every run has a timeout: a regression
fails in seconds instead of hanging the suite."""

from __future__ import annotations

import os

from helpers import EVALUATE, PAPER, PREDICT, QUICK, assert_bad_input, cli_env, make_folder, run_cli

REFUSAL_S = 60  # a refusal at start-up takes a few seconds (imports); a blocked read never ends
RUN_S = 120


def test_a_fifo_as_the_config_file_is_refused(tmp_path):
    fifo = tmp_path / "exp.yaml"
    os.mkfifo(fifo)
    proc = run_cli("--config", str(fifo), f"train.output_dir={tmp_path}/run", check=False, timeout=REFUSAL_S)
    assert_bad_input(proc, f"config file '{fifo}'", "a FIFO")
    assert not (tmp_path / "run").exists()


def test_a_fifo_inside_an_imagefolder_class_is_refused_naming_it(tmp_path):
    data = make_folder(tmp_path / "data", 2, 2, 1)
    fifo = data / "val" / "class1" / "stream.png"
    os.mkfifo(fifo)
    args = [
        "--config", PAPER, f"data.root={data}", f"train.output_dir={tmp_path}/run", "model.width=0.125",
        "data.image_size=67", "data.resize_size=72", "model.num_classes=2", "train.batch_size=2",
        "data.num_workers=0", "tracking.wandb=false", "train.progress=false", "train.max_steps=1",
    ]  # fmt: skip
    assert_bad_input(run_cli(*args, check=False, timeout=REFUSAL_S), f"image {fifo}", "a FIFO", "fix or remove it")
    assert not (tmp_path / "run").exists()


def test_fifos_as_peak_cache_checkpoints_records_and_inputs(tmp_path):
    """One run, then a FIFO at each further place it reads: the peak cache (measured afresh,
    one line), the newest checkpoint under resume=auto (one warning, resumes from the real
    one), the same FIFO as train.resume, metrics.jsonl on resume, and the serving commands'
    checkpoint and image inputs (exit 2, naming it)."""
    cache = tmp_path / "cache" / "distalex"
    cache.mkdir(parents=True)
    os.mkfifo(cache / "peak.json")
    env = cli_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = tmp_path / "run"
    proc = run_cli(*QUICK, "train.max_steps=2", f"train.output_dir={out}", env=env, timeout=RUN_S)
    peak = [ln for ln in proc.stdout.splitlines() if "peak" in ln and "TFLOP/s" in ln]
    assert len(peak) == 1 and "peak cache" in peak[0] and "a FIFO" in peak[0] and "not cached" in peak[0], peak
    assert (cache / "peak.json").is_fifo()  # neither read nor replaced

    fifo = out / "checkpoints" / "step_000000099.safetensors"
    os.mkfifo(fifo)
    proc = run_cli(*QUICK, "train.max_steps=3", f"train.output_dir={out}", "train.resume=auto", env=env, timeout=RUN_S)
    warned = [ln for ln in proc.stderr.splitlines() if str(fifo) in ln]
    assert len(warned) == 1 and "FIFO" in warned[0] and "step_000000002" in proc.stdout, proc.stderr[-2000:]
    real = out / "checkpoints" / "step_000000003.safetensors"
    assert real.is_file()

    other = tmp_path / "other"
    proc = run_cli(*QUICK, f"train.resume={fifo}", f"train.output_dir={other}", check=False, timeout=REFUSAL_S)
    assert_bad_input(proc, str(fifo), "a FIFO")
    assert not other.exists()

    image = tmp_path / "photo.png"
    os.mkfifo(image)
    proc = run_cli(str(real), str(image), script=PREDICT, check=False, timeout=REFUSAL_S)
    assert_bad_input(proc, str(image), "a FIFO")
    assert proc.stdout == ""
    proc = run_cli(str(fifo), script=EVALUATE, check=False, timeout=REFUSAL_S)
    assert_bad_input(proc, str(fifo), "a FIFO")

    (out / "metrics.jsonl").unlink()
    os.mkfifo(out / "metrics.jsonl")
    proc = run_cli(
        *QUICK, "train.max_steps=4", f"train.output_dir={out}", "train.resume=auto", check=False, timeout=REFUSAL_S
    )
    assert_bad_input(proc, "metrics.jsonl", "FIFO")
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-2:] == [real.name, fifo.name]
