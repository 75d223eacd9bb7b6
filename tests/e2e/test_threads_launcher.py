"""train.threads through `accelerate launch --num_processes 1` (README block (a)): the launcher
hands its child OMP_NUM_THREADS=1 unless told a number, and the run still trains with the cores
it has (auto) or with the count asked for; the count is printed beside the peak, recorded in
summary.json, and the peak is measured at it and at the precision the run trains in."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from distalex.runtime.threads import cgroup_quota

from helpers import ROOT, TINY, TRAIN, cli_env, summary

ARGS = [
    "--config", TINY, "tracking.wandb=false", "train.progress=false", "train.max_steps=2",
    "data.train_limit=64", "data.test_limit=32", "train.batch_size=32",
]  # fmt: skip


def auto_count() -> int:
    """What auto should give one process here: the affinity, capped by a cgroup quota."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def launch(tmp_path, name: str, *extra: str):
    """README block (a)'s command on the CPU; OMP_NUM_THREADS=1 as a user's shell may have it
    (what accelerate then passes on, the same 1 it writes when nothing is set)."""
    out = tmp_path / name
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
        TRAIN, *ARGS, f"train.output_dir={out}", *extra,
    ]  # fmt: skip
    env = cli_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("distalex: peak")]
    assert len(lines) == 1, proc.stdout[-2000:]
    printed = re.search(r"; training with (\d+) CPU threads? per process \(train\.threads=", lines[0])
    assert printed, lines[0]
    return int(printed.group(1)), summary(out)


@pytest.mark.parametrize("asked", [None, 1], ids=["auto", "one"])
def test_the_launched_run_trains_with_the_threads_of_its_config(tmp_path, asked):
    expected = auto_count() if asked is None else asked
    if asked is None and expected == 1:
        pytest.skip("one usable core: auto and the launcher's OMP_NUM_THREADS=1 agree")
    printed, s = launch(tmp_path, "run", *([] if asked is None else [f"train.threads={asked}"]))
    assert printed == expected and s["threads"] == expected
    assert s["usable_cores"] == auto_count()
    # The peak is that of this run: measured at its thread count, in the precision it trains in.
    assert f", {expected} thread{'s' if expected != 1 else ''}" in s["peak_source"]
    assert s["peak_precision"] == ("bf16" if s["mixed_precision"] == "bf16" else "fp32")
    assert s["peak_source"].startswith(f"measured {s['peak_precision']} matmul")
