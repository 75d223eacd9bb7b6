"""Launch glue: the process group and accelerator of a run, and its orderly end."""

from __future__ import annotations

import gc
import importlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from distalex.config import TrainConfig
from distalex.parallel.ddp import DDPOptions
from distalex.runtime import determinism, threads
from distalex.runtime.elastic import init_for_restarts
from distalex.runtime.precision import resolve_precision


def group_timeout(train: TrainConfig) -> timedelta:
    """``train.timeout_s`` as the timeout every process group of the run gets."""
    return timedelta(seconds=train.timeout_s)


def make_accelerator(train: TrainConfig, ddp: DDPOptions, timeout: timedelta, log_with=None, project_dir=None):
    """The process group (every group gets ``train.timeout_s``), this rank's device,
    then the precision ``auto`` stands for on that device (distalex/runtime/precision.py)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    determinism.configure(train.deterministic, train.cudnn_benchmark)  # before CUDA starts
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Imported before the process group exists, on purpose: imported after it (torch.optim's
        # and DDP's constructors import it), torch._dynamo leaves a reference to
        # the default group that destroy_process_group() does not release (torch 2.14.1,
        # measured), so the group's gloo threads outlive the run -- see shutdown().
        importlib.import_module("torch._dynamo")

    cuda = torch.cuda.is_available()
    init_for_restarts(timeout, cuda)  # before accelerate, which then adopts the group
    state = PartialState(cpu=not cuda, timeout=timeout)  # sets this rank's device
    return Accelerator(
        cpu=not cuda,
        mixed_precision=resolve_precision(train.mixed_precision, state.device),
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timeout),
            ddp.accelerate_kwargs(),
        ],
    )


def processes_per_node(accelerator) -> int:
    """Processes of this job on this node (the launcher says; at least this rank's local index + 1)."""
    return max(threads.local_processes(), accelerator.local_process_index + 1)


def shutdown() -> None:
    """Stop every process group's threads while the interpreter is fully alive.

    ``destroy_process_group`` forgets the groups but stops no thread: a gloo group's
    worker and transport threads end only in its destructor, when the last
    reference to it goes, and DDP's reducer, the device mesh and the trainer's
    placement hold such references, partly in reference cycles that only the
    garbage collector frees.  Left to interpreter teardown, a gloo thread that
    drops its last finished work then needs the GIL of a finalizing interpreter;
    Python ends such a thread with ``pthread_exit``, whose unwinding through a
    ``noexcept`` C++ frame calls ``std::terminate``: a finished rank dies with
    SIGABRT ("terminate called without an active exception") now and then.  So
    the groups are destroyed, then the run's objects are collected here, which
    runs the destructors that join those threads (they release the GIL to do so).
    The caller must hold no reference to the run (the trainer) any more."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
