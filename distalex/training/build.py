"""Building a run from its config: everything the trainer needs before its first step.

:func:`build_run` is the one place a run is put together; it hands the trainer a
finished :class:`Run`.  Each derived value (the network's spec, DDP's options,
the process groups' timeout) is computed here, once.  The order is the rule that
matters: everything that can refuse the run (the placement, the output dir, the
resume checkpoint, the data and its files) comes before anything is written.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distalex.config import OptimConfig, TrainConfig, to_container
from distalex.data import DataBundle, SharedCheck, build_data
from distalex.model.alexnet import spec_from_config
from distalex.parallel.ddp import DDPOptions
from distalex.parallel.launch import group_timeout, make_accelerator
from distalex.parallel.placement import Placement, make_placement
from distalex.runtime import determinism, threads
from distalex.runtime.elastic import restart_count
from distalex.runtime.hostmem import keep_freed_memory, memory_limit
from distalex.runtime.rundir import RunDirLock, claim_output_dir, prepare_output_dir
from distalex.telemetry.mfu import Utilization, for_run
from distalex.telemetry.profiling import StepProfiler
from distalex.telemetry.records import RunLog
from distalex.telemetry.tracker import run_name
from distalex.training import checkpoint
from distalex.training.memory_estimate import check_fits, estimate
from distalex.training.meters import TrainMeter
from distalex.training.schedule import LRSchedule
from distalex.training.state import TrainingState


@dataclass
class Run:
    """Everything one run needs, built and checked: the trainer only runs the loop over it."""

    cfg: object  # the validated, read-only config (recorded in checkpoints and wandb)
    accelerator: object
    placement: Placement
    run_dir: RunDirLock  # this run's claim on train.output_dir, released by close()
    data: DataBundle
    state: TrainingState
    model: nn.Module  # what a training step calls: the placed model, wrapped for DDP, compiled if asked
    log: RunLog
    profiler: StepProfiler
    utilization: Utilization
    run_info: dict  # the head of summary.json and of the wandb run's config
    max_steps: int
    eval_batch: int  # rows per process in evaluation
    started: float  # perf_counter() when this segment of the run started
    last_eval: dict  # the newest evaluation row (checkpointed with the state)
    checkpointed_step: int | None  # the step whose checkpoint this run's own dir holds

    @property
    def steps_per_epoch(self) -> int:
        return self.data.train.batches_per_epoch

    def close(self) -> None:
        """Give the output dir back (on every exit; a killed run's lock goes with its process)."""
        self.run_dir.release()


def build_run(cfg) -> Run:
    """The finished run for ``cfg``; on any failure the output dir is released again."""
    started = time.perf_counter()
    # First: launchers overwrite OMP_NUM_THREADS, so the config decides (runtime/threads.py).
    thread_count = threads.configure(cfg.train.threads)
    spec = spec_from_config(cfg)
    spec.check()
    timeout = group_timeout(cfg.train)
    ddp = DDPOptions.from_config(cfg.ddp, spec, gloo=not torch.cuda.is_available())
    accelerator = make_accelerator(
        cfg.train,
        ddp,
        timeout,
        log_with="wandb" if cfg.tracking.wandb else None,
        project_dir=cfg.train.output_dir,
    )
    placement = make_placement(
        cfg.split_mode, spec, cfg.train.batch_size, ddp, timeout, accelerator, pipeline_cfg=cfg.pipeline, fsdp=cfg.fsdp
    )
    check_memory(cfg, spec, placement)
    if cfg.train.reuse_host_memory and placement.device.type == "cpu":
        keep_freed_memory()
    for notice in placement.notices:
        accelerator.print(f"distalex: {notice}")
    # The run owns its output dir from here to its end (released by Run.close(), or by
    # the kernel when the process dies).
    run_dir = claim_output_dir(cfg.train, placement)
    try:
        return _build(cfg, accelerator, placement, run_dir, started, thread_count)
    except BaseException:
        run_dir.release()
        raise


def check_memory(cfg, spec, placement) -> None:
    """Refuse, before anything is allocated or written, a config whose step cannot fit this
    machine's memory or its device's (distalex/training/memory_estimate.py: a lower bound)."""
    p = placement
    processes = threads.local_processes()
    est = estimate(cfg, spec, p.mesh.world_size, p.mesh.replicas, p.device.type, processes)
    device_bytes = torch.cuda.get_device_properties(p.device).total_memory if p.device.type == "cuda" else None
    check_fits(est, memory_limit(), device_bytes)


def _build(cfg, accelerator, p: Placement, run_dir: RunDirLock, started: float, thread_count) -> Run:
    warn = main_process_printer(p)
    # Everything that can refuse the run does so before anything is written.
    # Every rank reads the checkpoint; one that cannot (another node's disk) must not leave
    # the others waiting for it: its refusal is every rank's, printed once.
    resume_path, saved = p.check_together(read_resume_checkpoint, cfg, p, warn)
    data = load_data(cfg, p, warn)
    prepare_output_dir(cfg.train, resume_path, p, notify=warn)
    # The peak of the precision this process trains in: "auto" resolved on its own device.
    utilization, peak_line = for_run(cfg.train, p, accelerator.mixed_precision)
    accelerator.print(f"distalex: {peak_line}; training with {thread_count.describe()}")

    state = fresh_state(p, accelerator, cfg.model.init, cfg.optim, cfg.train)
    last_eval: dict = {}
    checkpointed_step = None
    if saved is not None:
        last_eval = restore(saved, resume_path, p, state, accelerator)
        if Path(resume_path).resolve().parent == Path(checkpoint.checkpoint_dir(cfg.train.output_dir)).resolve():
            checkpointed_step = state.position.step
    # The raw module lives in state.model; DDP wraps it, torch.compile (optionally) the wrapper.
    wrapped = p.wrap(state.model, accelerator)
    model = torch.compile(wrapped) if cfg.train.compile else wrapped

    log = RunLog(cfg.train.output_dir, p.is_main, accelerator, plots=cfg.tracking.plots)
    if saved is not None:
        log.trim_after(state.position.step, carried=last_eval)
    info = run_info(cfg, p, accelerator, utilization, thread_count)
    name = run_name(cfg, p.mesh.world_size, info["device"], info["mixed_precision"])
    log.start_wandb(cfg, {**info, "config": to_container(cfg)}, name)
    t = cfg.train
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        placement=p,
        run_dir=run_dir,
        data=data,
        state=state,
        model=model,
        log=log,
        profiler=StepProfiler(t.profile, state.model, p, t.output_dir, log.title),
        utilization=utilization,
        run_info=info,
        max_steps=t.max_steps or t.epochs * data.train.batches_per_epoch,
        eval_batch=max(1, (cfg.eval.batch_size or t.batch_size) // p.mesh.replicas),
        started=started,
        last_eval=last_eval,
        checkpointed_step=checkpointed_step,
    )


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
    data = build_data(cfg, p.replica, p.mesh.replicas, p.device, check, p.input_share())
    for warning in data.warnings:
        warn(f"distalex: warning: {warning}")
    return data


def fresh_state(placement, accelerator, init: str, o: OptimConfig, train: TrainConfig) -> TrainingState:
    """Step 0: the placed model at its initial weights, SGD as configured, a new schedule and meter."""
    model = placement.build_model(init, train.seed, channels_last=train.channels_last)
    sgd = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=o.foreach
    )
    # Dropout draws differ per rank; the data order does not use this RNG.
    torch.manual_seed(train.seed * 1000 + placement.rank + 1)
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


def run_info(cfg, placement, accelerator, utilization, thread_count) -> dict:
    """What the run is (placement, precision, determinism, device, threads, peak): the head of
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
        "pipeline_stages": p.mesh.stages,
        "mixed_precision": accelerator.mixed_precision,  # what "auto" resolved to on this device
        **determinism.describe(),
        "global_batch": cfg.train.batch_size,
        "device": device,
        "threads": torch.get_num_threads(),  # what each process computes with (train.threads)
        "usable_cores": thread_count.cores,
        **utilization.run_info(),
    }


def progress_bar(train: TrainConfig, title: str, placement, total: int, initial: int):
    """A tqdm bar on the main process (if train.progress), a stand-in elsewhere."""
    if not (placement.is_main and train.progress):
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=title, dynamic_ncols=True)


class _NoProgress:
    """Stands in for a tqdm bar on ranks (or runs) without one."""

    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
