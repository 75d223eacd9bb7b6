#!/usr/bin/env python
"""Stress the end of a multi-process run: N short 2-process runs, count how each one ended.

A finished rank must exit 0.  A rank that aborts at interpreter exit (SIGABRT,
"terminate called without an active exception") makes the launcher report the
whole job as failed, so under a restart policy it would train again.  This
script runs many short jobs through ``accelerate launch`` (as users do), in
every multi-process placement in turn, and counts exit statuses and aborts.
Not part of the test suite (minutes of CPU); run it after touching process
teardown:

    python scripts/exit_stress.py --runs 200                # ~2 runs/min on 2 cores
    python scripts/exit_stress.py --quick                   # one run per mode, to see it work
    python scripts/exit_stress.py --runs 50 --modes ddp --data fashion_mnist --logs /tmp/stress

Exit status 0 when every run exited 0 and printed ``distalex: done:``, 1 otherwise.
The last line is a JSON summary (runs, per-mode counts, exit statuses, aborts).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "launch" / "train.py")
TINY = str(ROOT / "configs" / "tiny.yaml")
ABORT_MARKS = ("SIGABRT", "terminate called", "Signal 6", "core dumped", "Aborted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(mode: str, data: str, out: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), TRAIN, "--config", TINY, "--split-mode", mode,
        "tracking.wandb=false", "tracking.plots=false", "train.progress=false", f"data.name={data}",
        "data.train_limit=256",
        "data.test_limit=64", "train.batch_size=32", f"train.max_steps={steps}", "train.log_every=1",
        f"train.output_dir={out}",
    ]  # fmt: skip


def classify(rc: int, text: str) -> str:
    if any(mark in text for mark in ABORT_MARKS) or rc in (-6, 134):
        return "abort"
    if rc == 0 and "distalex: done:" in text:
        return "ok"
    if rc == 0:
        return "exit0-without-done"
    return f"exit{rc}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="number of jobs (modes alternate)")
    ap.add_argument("--modes", default="ddp,model-parallel", help="comma-separated multi-process split modes")
    ap.add_argument("--data", default="synthetic", help="data.name of the runs (synthetic is the fastest)")
    ap.add_argument("--steps", type=int, default=3, help="train.max_steps of each run")
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a run counts as hung")
    ap.add_argument("--logs", default=None, help="folder for the output of every run that did not end well")
    ap.add_argument("--quick", action="store_true", help="one run per mode (a smoke test of this script)")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    runs = len(modes) if args.quick else args.runs
    logs = Path(args.logs) if args.logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    counts: dict[str, collections.Counter] = {m: collections.Counter() for m in modes}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="exit_stress_") as tmp:
        for i in range(runs):
            mode = modes[i % len(modes)]
            out = Path(tmp) / f"run{i}"
            try:
                proc = subprocess.run(
                    command(mode, args.data, out, args.steps),
                    capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT,
                )  # fmt: skip
                rc, text = proc.returncode, proc.stdout + proc.stderr
                outcome = classify(rc, text)
            except subprocess.TimeoutExpired as exc:
                rc, outcome = None, "hung"
                text = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
            counts[mode][outcome] += 1
            if outcome != "ok" and logs:
                (logs / f"run{i}_{mode}_{outcome}.log").write_text(text)
            print(f"run {i + 1}/{runs} {mode}: {outcome} (rc {rc})", flush=True)
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    result = {
        "runs": runs,
        "seconds": round(time.time() - started, 1),
        "data": args.data,
        "steps": args.steps,
        "by_mode": {m: dict(c) for m, c in counts.items()},
        "ok": total["ok"],
        "aborts": total["abort"],
        "other_failures": runs - total["ok"] - total["abort"],
    }
    print(json.dumps(result), flush=True)
    return 0 if total["ok"] == runs else 1


if __name__ == "__main__":
    sys.exit(main())
