"""A finished rank exits cleanly: when the CLI's main() returns, no thread the run
started is left (gloo's worker and transport threads alive at interpreter teardown
abort a finished rank now and then with SIGABRT).  The statistical check of the same
property over hundreds of real runs is scripts/exit_stress.py (not part of the suite)."""

import ast
import re
import sys
from pathlib import Path

import pytest

from helpers import QUICK, SPLIT_MODES, cli_env, launch_cmd

PROBE = str(Path(__file__).resolve().parent / "teardown_probe.py")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads through /proc")
@pytest.mark.parametrize("mode", ["ddp", "model-parallel"])
def test_no_thread_outlives_the_run(tmp_path, mode):
    import subprocess

    nprocs, split = SPLIT_MODES[mode]
    args = [*QUICK, *split, "data.name=synthetic", "train.max_steps=2", f"train.output_dir={tmp_path}"]
    proc = subprocess.run(
        launch_cmd(nprocs, *args, script=PROBE), capture_output=True, text=True, timeout=300, env=cli_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = re.findall(r"teardown-probe rank=(\d+) rc=(\d+) before=(\[.*?\]) after=(\[.*?\])", proc.stdout)
    assert sorted(int(r[0]) for r in reports) == list(range(nprocs)), proc.stdout[-3000:]
    for rank, rc, before, after in reports:
        before, after = ast.literal_eval(before), ast.literal_eval(after)
        assert rc == "0"
        assert not [t for t in after if "gloo" in t], f"rank {rank}: gloo threads left: {after}"
        assert len(after) == len(before), f"rank {rank}: threads before the run {before}, after {after}"
