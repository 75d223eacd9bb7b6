"""Building a run from its config: what the Trainer needs before its first step.

Each function does one thing.  The order in which ``Trainer`` calls them is the
rule that matters: everything that can refuse the run (the resume checkpoint,
the data and its files) comes before anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from distalex.config import to_container
from distalex.data import DataBundle, SharedCheck, build_data
from distalex.runtime import determinism
from distalex.runtime.elastic import restart_count
from distalex.training import checkpoint
from distalex.training.meters import TrainMeter
from distalex.training.schedule import LRSchedule
from distalex.training.state import TrainingState


def main_process_printer(placement):
    """A function printing one line to stderr on the main process only (warnings, notices)."""

    def warn(line: str) -> None:
        if placement.is_main:
            print(line, file=sys.stderr, flush=True)

    return warn


def read_resume_checkpoint(cfg, placement, warn) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its contents, checked against this run's network
    and the keys that decide what a step trains on; (None, None) for a fresh start."""
    t = cfg.train
    path, saved = checkpoint.resolve(t.resume, t.output_dir, warn=warn)
    if path is not None:
        checkpoint.check_architecture(saved, placement.spec, path)
        checkpoint.check_same_steps(saved, to_container(cfg), t.resume_allow_changes, path)
    return path, saved


def load_data(cfg, placement, warn) -> DataBundle:
    """This replica's data; all processes check the input files together; warnings printed once."""
    p = placement
    check = SharedCheck(p.rank, p.mesh.world_size, p.min_over_ranks, p.is_main and cfg.train.progress)
    data = build_data(cfg, p.replica, p.mesh.replicas, p.device, check)
    for warning in data.warnings:
        warn(f"distalex: warning: {warning}")
    return data


def fresh_state(cfg, placement, accelerator) -> TrainingState:
    """Step 0: the placed model at its initial weights, SGD as configured, a new schedule and meter."""
    model = placement.build_model(cfg.model.init, cfg.train.seed)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    sgd = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=o.foreach
    )
    # Dropout draws differ per rank; the data order does not use this RNG.
    torch.manual_seed(cfg.train.seed * 1000 + placement.rank + 1)
    return TrainingState(
        model=model,
        optimizer=accelerator.prepare_optimizer(sgd),
        schedule=LRSchedule.from_config(o),
        scaler=accelerator.scaler,
        meter=TrainMeter(placement),
    )


def restore(saved: dict, path: Path, placement, state: TrainingState, accelerator) -> dict:
    """Load a checkpoint into ``state`` (any placement's checkpoint into this one) and return
    the evaluation row it carried (the newest, so a resumed run's records continue)."""
    same = checkpoint.restore(saved, placement, state)
    p = state.position
    accelerator.print(
        f"distalex: resumed from {path} at step {p.step} (epoch {p.epoch}, batch {p.batch})"
        + ("" if same else "; placement changed, RNG streams start afresh")
        + (f"; launcher restart {restart_count()}" if restart_count() else "")
    )
    return dict(saved.get("last_eval") or {})


def run_info(cfg, placement, accelerator, utilization) -> dict:
    """What the run is (placement, precision, determinism, device, peak): the head of
    summary.json and of the wandb run's config."""
    p = placement
    device = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else "cpu"
    return {
        "split_mode": cfg.split_mode,
        "world_size": p.mesh.world_size,
        "replicas": p.mesh.replicas,
        "towers": cfg.model.towers,
        "tower_processes": p.mesh.tower_ranks,
        "fc_shards": p.mesh.fc_shards,
        "mixed_precision": accelerator.mixed_precision,  # what "auto" resolved to on this device
        **determinism.describe(),
        "global_batch": cfg.train.batch_size,
        "device": device,
        **utilization.run_info(),
    }


def progress_bar(cfg, placement, total: int, initial: int):
    """A tqdm bar on the main process (if train.progress), a stand-in elsewhere."""
    if not (placement.is_main and cfg.train.progress):
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=cfg.experiment, dynamic_ncols=True)


class _NoProgress:
    """Stands in for a tqdm bar on ranks (or runs) without one."""

    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
