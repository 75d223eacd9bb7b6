"""Shared test helpers: run the real CLI (one process, or N gloo ranks through
``accelerate launch``), read a run's records, find free ports."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "launch" / "train.py")
TINY = str(ROOT / "configs" / "tiny.yaml")
# A few seconds per run on 2 cores: 1/8-width network, 67x67 images, small subsets.
QUICK = ["--config", TINY, "tracking.wandb=false", "train.progress=false",
         "data.train_limit=1024", "data.test_limit=256", "train.batch_size=32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def launch_cmd(nprocs: int, *args, extra_launch=()) -> list:
    """The command users type: plain python for 1 process, accelerate launch for more."""
    if nprocs == 1:
        return [sys.executable, TRAIN, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(nprocs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *extra_launch, TRAIN, *args]


def run_cli(*args, nprocs: int = 1, timeout: float = 300, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch_cmd(nprocs, *args), capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir) -> list:
    with open(Path(run_dir) / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def step_losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "train_acc" not in r and "loss" in r}


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def latest_checkpoint(run_dir) -> Path:
    return sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))[-1]


@pytest.fixture
def quick():
    return list(QUICK)
