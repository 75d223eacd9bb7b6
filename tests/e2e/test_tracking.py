"""Experiment tracking end to end (real CLI subprocesses): an offline wandb run
read back from its files, compare on real runs, a broken tracker that must not
stop training, and a multi-process run where only the main process writes."""

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from distalex.runtime.precision import resolve_precision

from helpers import ONE_THREAD, ROOT, TINY, TRAIN, cli_env, metrics, png_size, summary

COMPARE = str(ROOT / "launch" / "compare.py")
SCRIPT = str(ROOT / "launch" / "compare_placements.sh")
LOG_EVERY, STEPS_PER_EPOCH, EPOCHS = 4, 8, 2
# 256 images / batch 32 = 8 steps per epoch, 2 epochs: a few seconds on 2 cores.
TINY_RUN = [
    "--config",
    TINY,
    "train.progress=false",
    "tracking.wandb=true",
    "data.train_limit=256",
    "data.test_limit=64",
    "train.batch_size=32",
    f"train.epochs={EPOCHS}",
    f"train.log_every={LOG_EVERY}",
    ONE_THREAD,
]
RUN_FACTS = ("split_mode", "world_size", "replicas", "towers", "mixed_precision", "global_batch", "device")


def wandb_env(tmp, **extra) -> dict:
    """No credentials, no WANDB_* settings from outside (CI sets WANDB_MODE=disabled)."""
    env = cli_env()
    for var in [v for v in env if v.startswith("WANDB_")]:
        del env[var]
    env["NETRC"] = str(Path(tmp) / "no-netrc")
    env.update(extra)
    return env


def train(tmp, out, *extra, env=None, nprocs=1):
    cwd = Path(tmp) / "cwd"
    cwd.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, TRAIN, *TINY_RUN, *extra, f"train.output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env or wandb_env(tmp),
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


# -- reading an offline run back: wandb 0.31 has no Python reader of its .wandb
# transaction log, a LevelDB-style log of protobuf Records (32 KiB blocks,
# 7-byte record headers: crc32, length, type full/first/middle/last).
def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payload = chunk
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
            continue
        elif kind == 4:
            payload, pending = pending + chunk, b""
        else:
            continue
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _items(items):
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_offline_run(run_dir: Path) -> dict:
    """run (name, group, job_type, project), config, final summary, history rows."""
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, files
    out = {"config": {}, "summary": {}, "history": []}
    for r in wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {
                "name": r.run.display_name,
                "group": r.run.run_group,
                "job_type": r.run.job_type,
                "project": r.run.project,
                "tags": list(r.run.tags),
            }
            out["config"].update(_items(r.run.config.update))
        elif kind == "config":
            out["config"].update(_items(r.config.update))
        elif kind == "summary":
            out["summary"].update(_items(r.summary.update))  # in order: the last value wins
        elif kind == "history":
            out["history"].append(_items(r.history.item))
    return out


def wandb_history(run_dir: Path) -> dict:
    """{step: {key: value}} of an offline run's history, as wandb's own reader prints it
    (``wandb leet inspect --json``: one JSON record per line; what one step logs merged)."""
    wandb = Path(sys.executable).parent / "wandb"
    proc = subprocess.run(
        [str(wandb), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history: dict = {}
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            item = record["history"]["item"]
            history.setdefault(item["_step"], {}).update({k: v for k, v in item.items() if not k.startswith("_")})
    return history


def offline_runs(root: Path) -> list:
    return sorted((root / "wandb").glob("offline-run-*"))


def png_ok(path: Path) -> int:
    size, width, height = png_size(path)
    assert width > 100 and height > 100
    return size


def check_complete(run_dir, steps=STEPS_PER_EPOCH * EPOCHS):
    rows = metrics(run_dir)
    step_rows = [r["step"] for r in rows if "test_acc" not in r]
    epoch_rows = [r for r in rows if "test_acc" in r]
    assert step_rows == list(range(LOG_EVERY, steps + 1, LOG_EVERY))
    assert [r["epoch"] for r in epoch_rows] == [float(e) for e in range(1, EPOCHS + 1)]
    assert all({"loss", "train_acc", "test_acc", "examples_per_sec"} <= set(r) for r in epoch_rows)
    s = summary(run_dir)
    assert s["steps"] == steps and s["test_acc"] == epoch_rows[-1]["test_acc"]
    png_ok(Path(run_dir) / "curves.png")
    return rows


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """Default user setup: wandb on, no account, no WANDB_* variables."""
    tmp = tmp_path_factory.mktemp("offline")
    out = tmp / "run-offline"
    proc = train(tmp, out)
    return out, proc, tmp


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    """WANDB_DIR under a regular file: wandb cannot write anything."""
    tmp = tmp_path_factory.mktemp("broken")
    (tmp / "a-file").write_text("")
    out = tmp / "run-broken"
    proc = train(tmp, out, env=wandb_env(tmp, WANDB_DIR=str(tmp / "a-file" / "wandb")))
    return out, proc, tmp


def test_offline_wandb_run_has_run_facts_config_and_final_summary(offline_run):
    out, proc, tmp = offline_run
    rows = check_complete(out)
    runs = offline_runs(out)  # offline files under the run's output dir
    assert len(runs) == 1, runs
    assert f"wandb sync {runs[0]}" in proc.stdout + proc.stderr
    assert list((tmp / "cwd").iterdir()) == []  # nothing in the working directory
    run = read_offline_run(runs[0])

    precision = resolve_precision("auto", torch.device("cpu"))  # the default: bf16 where the CPU has it
    assert run["run"]["name"] == f"tiny-single-1xcpu-{'fp32' if precision == 'no' else precision}"
    assert (run["run"]["group"], run["run"]["job_type"], run["run"]["project"]) == ("tiny", "single", "distalex")
    config = run["config"]
    assert set(RUN_FACTS) <= set(config)
    assert (config["split_mode"], config["world_size"], config["replicas"], config["towers"]) == ("single", 1, 1, 1)
    assert (config["mixed_precision"], config["global_batch"], config["device"]) == (precision, 32, "cpu")
    full = config["config"]  # the full experiment config
    assert full["experiment"] == "tiny" and full["train"]["batch_size"] == 32
    assert full["data"]["train_limit"] == 256 and full["model"]["width"] == 0.125

    final = summary(out)
    for key, value in final.items():  # summary.json == the wandb run's summary
        assert (
            run["summary"][key] == pytest.approx(value, rel=1e-12)
            if isinstance(value, float)
            else run["summary"][key] == value
        ), key
    for key in ("loss", "train_acc", "test_acc", "examples_per_sec", "wall_time_s"):
        assert isinstance(run["summary"][key], float)

    # Every figure of metrics.jsonl is in wandb's history, and nothing else is: read back by
    # wandb's own reader.  At an epoch's last step the step row and the epoch row share a wandb
    # step; their figures are under step/... and epoch/... (docs/records.md), so neither
    # overwrites the other.
    history = wandb_history(runs[0])
    expected = {}
    for r in rows:
        kind = "epoch" if "test_acc" in r else "step"
        expected.setdefault(r["step"], {}).update({f"{kind}/{k}": v for k, v in r.items() if k != "step"})
    assert sorted(history) == sorted(expected)
    for step, logged in history.items():
        assert logged == pytest.approx(expected[step], rel=1e-15), step
    last_of_epoch = STEPS_PER_EPOCH  # the step that has both rows: both losses reach wandb
    assert {"step/loss", "epoch/loss"} <= set(history[last_of_epoch])
    assert history[last_of_epoch]["step/loss"] != history[last_of_epoch]["epoch/loss"]
    # MFU reaches wandb in every row and in the summary.
    assert {"mfu", "tflops_per_sec", "flops_per_example"} <= set(run["summary"])
    for r in rows:
        kind = "epoch" if "test_acc" in r else "step"
        assert {f"{kind}/mfu", f"{kind}/tflops_per_sec"} <= set(history[r["step"]])


@pytest.mark.parametrize("failure", ["unwritable_dir", "init_raises"])
def test_broken_tracker_warns_once_and_training_completes(tmp_path, broken_run, failure):
    if failure == "unwritable_dir":
        out, proc, tmp = broken_run
        assert not (tmp / "a-file").is_dir()
        assert "Falling back to temporary directory" not in proc.stderr  # wandb did not go elsewhere
    else:  # online mode without an API key: wandb.init raises
        out = tmp_path / "run"
        proc = train(tmp_path, out, env=wandb_env(tmp_path, WANDB_MODE="online"))
    warnings = [line for line in proc.stderr.splitlines() if "wandb tracker disabled" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert warnings[0].startswith("warning:") and str(out / "metrics.jsonl") in warnings[0]
    check_complete(out)
    assert offline_runs(out) == []


def test_compare_two_real_runs_prints_their_summaries(offline_run, broken_run, tmp_path):
    a, b = offline_run[0], broken_run[0]
    proc = subprocess.run(
        [sys.executable, COMPARE, str(a), str(b), "--out", str(tmp_path / "cmp")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith("run-")}
    sa, sb = summary(a), summary(b)
    for label, s in (("run-offline", sa), ("run-broken", sb)):
        precision = "fp32" if s["mixed_precision"] == "no" else s["mixed_precision"]
        assert lines[label][1:8] == [
            s["split_mode"],
            str(s["world_size"]),
            str(s["towers"]),
            precision,
            f"{s['test_acc']:.4f}",
            f"{s['examples_per_sec']:.1f}",
            f"{s['wall_time_s']:.1f}",
        ]
    assert lines["run-offline"][8] == "1.00x"
    assert lines["run-broken"][8] == f"{sb['examples_per_sec'] / sa['examples_per_sec']:.2f}x"
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["test_acc"] for r in report["runs"]] == [sa["test_acc"], sb["test_acc"]]
    assert [r["examples_per_sec"] for r in report["runs"]] == [sa["examples_per_sec"], sb["examples_per_sec"]]
    assert png_ok(tmp_path / "cmp" / "comparison.png") > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp"]


AUDIT = textwrap.dedent('''
    """Test-only: record every file this Python process creates or opens for
    writing under $AUDIT_ROOT, tagged with its torch rank."""
    import os, sys
    _root = os.environ.get("AUDIT_ROOT")
    if _root:
        _log = open(os.path.join(os.environ["AUDIT_LOG"], f"writes-{os.getpid()}.txt"), "a", buffering=1)
        _rank = os.environ.get("RANK", "-")
        _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                if not ((isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & _W)):
                    return
            elif event in ("os.rename", "os.mkdir"):
                path = args[1] if event == "os.rename" else args[0]
            else:
                return
            if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(_root):
                _log.write(f"{_rank} {os.path.abspath(path)}\\n")
        sys.addaudithook(_hook)
''')


def test_placements_script_and_only_main_process_writes(tmp_path):
    """compare_placements.sh (single, then ddp, model-parallel, hybrid, pipeline and fsdp on 2 gloo ranks,
    then compare) with wandb offline: one wandb run per placement, and rank 1
    writes no curves, comparison, metrics or wandb files."""
    hook, audit, cwd, out = tmp_path / "hook", tmp_path / "audit", tmp_path / "cwd", tmp_path / "cmp"
    for d in (hook, audit, cwd):
        d.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    env = wandb_env(
        tmp_path,
        PYTHON=sys.executable,
        AUDIT_ROOT=str(tmp_path),
        AUDIT_LOG=str(audit),
        PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        ["bash", SCRIPT, "-n", "2", "-o", str(out), *TINY_RUN, "train.max_steps=4", "train.epochs=1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert list(cwd.iterdir()) == []

    summaries = {m: summary(out / m) for m in ("single", "ddp", "model-parallel", "hybrid", "pipeline", "fsdp")}
    assert [(s["split_mode"], s["world_size"], s["towers"]) for s in summaries.values()] == [
        ("single", 1, 1),
        ("ddp", 2, 1),
        ("model-parallel", 2, 2),
        ("hybrid", 2, 1),
        ("pipeline", 2, 1),
        ("fsdp", 2, 1),
    ]
    report = json.loads((out / "comparison.json").read_text())
    assert [r["split_mode"] for r in report["runs"]] == [
        "single",
        "ddp",
        "model-parallel",
        "hybrid",
        "pipeline",
        "fsdp",
    ]
    assert [r["examples_per_sec"] for r in report["runs"]] == [s["examples_per_sec"] for s in summaries.values()]
    png_ok(out / "comparison.png")
    for mode in summaries:
        runs = offline_runs(out / mode)
        assert len(runs) == 1, (mode, runs)  # one wandb run per placement, not one per rank
        run = read_offline_run(runs[0])
        assert run["run"]["job_type"] == mode  # runs of one placement line up in the UI
        config = run["config"]
        assert (config["split_mode"], config["world_size"]) == (mode, summaries[mode]["world_size"])
        steps = [r["step"] for r in metrics(out / mode)]
        assert steps == [4, 4]  # one step row and one epoch row: written once
        png_ok(out / mode / "curves.png")

    writes = [line.split(" ", 1) for f in audit.iterdir() for line in f.read_text().splitlines()]
    assert any(rank == "0" and p.endswith("curves.png") for rank, p in writes)  # the hook saw rank 0
    by_rank_1 = sorted({p for rank, p in writes if rank not in ("-", "0")})
    tracked = ("metrics.jsonl", "summary.json", "curves.png", "comparison", "wandb")
    assert not [p for p in by_rank_1 if any(t in p for t in tracked)], by_rank_1
