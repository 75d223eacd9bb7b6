"""Worker bodies that run distalex's real Trainer on one gloo rank each (spawned processes)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from helpers import TINY, nan_loss_at

# 96 synthetic images in global batches of 32: 3 steps per epoch; fp32, no records but metrics.
SETTINGS = [
    "tracking.wandb=false",
    "tracking.plots=false",
    "train.progress=false",
    "train.mixed_precision=no",
    "data.name=synthetic",
    "data.synthetic_train_size=96",
    "data.synthetic_test_size=32",
    "train.batch_size=32",
    "train.epochs=3",
    "train.log_every=100",
    "train.checkpoint_every=1",
    "train.timeout_s=60",
]


def join_job(rank: int, world: int, port: int) -> None:
    """This spawned process as rank ``rank`` of a ``world``-process job on this machine, as a
    launcher would set it up; one thread (the workers share the cores)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",  # gloo on the CPU on any machine (read when CUDA first initialises)
    )
    torch.set_num_threads(1)


def nan_loss_on_one_rank(rank, world, port, out_dir, nan_rank, nan_step):
    """ddp on ``world`` ranks; the loss of step ``nan_step`` is NaN on rank ``nan_rank`` only, and that
    step's update is skipped on every rank (the weights stay finite, as with a gradient scaler).
    Writes what ``fit()`` ended with to ``out_dir/outcome{rank}.txt``."""
    join_job(rank, world, port)
    from distalex.config import load_config
    from distalex.parallel.launch import shutdown
    from distalex.training.build import build_run
    from distalex.training.trainer import Trainer

    outcome = "finished"
    try:
        cfg = load_config(TINY, [*SETTINGS, f"train.output_dir={out_dir}/run"], split_mode="ddp")
        trainer = Trainer(build_run(cfg))
        nan_loss_at(trainer, nan_step, poison=rank == nan_rank)
        trainer.fit()
    except Exception as exc:  # recorded for the test to judge
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        shutdown()
        Path(out_dir, f"outcome{rank}.txt").write_text(outcome)


def refusal_on_one_rank(rank, world, port, out_dir, refusing_rank):
    """ddp on ``world`` ranks; only ``refusing_rank`` is given a resume checkpoint that does
    not exist (as if its node could not see the file).  Writes the error each rank ended with
    (class, exit status, message) to ``out_dir/outcome{rank}.txt``."""
    join_job(rank, world, port)
    from distalex.config import load_config
    from distalex.errors import DistalexError
    from distalex.parallel.launch import shutdown
    from distalex.training.build import build_run

    resume = f"{out_dir}/elsewhere/step_000000001.safetensors" if rank == refusing_rank else "null"
    outcome = "built"
    try:
        cfg = load_config(TINY, [*SETTINGS, f"train.output_dir={out_dir}/run", f"train.resume={resume}"], "ddp")
        build_run(cfg).close()
    except DistalexError as exc:
        outcome = f"{type(exc).__name__} {exc.exit_code} {exc}"
    finally:
        shutdown()
        Path(out_dir, f"outcome{rank}.txt").write_text(outcome)
