"""Launch glue: the process group and accelerator of a run, its orderly end, and its errors as one line."""

from __future__ import annotations

import gc
import importlib
import re
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from distalex.config import TrainConfig
from distalex.errors import RendezvousFailure, RunFailure
from distalex.parallel.ddp import DDPOptions
from distalex.runtime import determinism, threads
from distalex.runtime.elastic import init_for_restarts
from distalex.runtime.launcher import launcher_env
from distalex.runtime.precision import resolve_precision


def group_timeout(train: TrainConfig) -> timedelta:
    """``train.timeout_s`` as the timeout every process group of the run gets."""
    return timedelta(seconds=train.timeout_s)


def make_accelerator(train: TrainConfig, ddp: DDPOptions, timeout: timedelta, log_with=None, project_dir=None):
    """The process group (every group gets ``train.timeout_s``), this rank's device,
    then the precision ``auto`` stands for on that device (distalex/runtime/precision.py)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    env = launcher_env()  # before accelerate or torch.distributed reads a launcher variable
    determinism.configure(train.deterministic, train.cudnn_benchmark)  # before CUDA starts
    if env.world_size > 1:
        # Imported before the process group exists, on purpose: imported after it (torch.optim's
        # and DDP's constructors import it), torch._dynamo leaves a reference to
        # the default group that destroy_process_group() does not release (torch 2.14.1,
        # measured), so the group's gloo threads outlive the run -- see shutdown().
        importlib.import_module("torch._dynamo")

    cuda = torch.cuda.is_available()
    if env.world_size > 1 and env.rank != 0 and not dist.is_initialized():
        reach_rendezvous(env, timeout)
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


def reach_rendezvous(env, timeout: timedelta) -> None:
    """Wait (up to ``timeout``) until the job's rendezvous at MASTER_ADDR:MASTER_PORT accepts
    a connection.  torch's store client would retry too, but it logs every failed try with a
    C++ backtrace; a rendezvous that never answers is one :class:`RunFailure` line here."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=max(0.1, min(left, 5.0))):
                return
        except OSError as exc:
            if time.monotonic() + 0.2 >= deadline:
                raise RendezvousFailure(
                    f"the job's rendezvous at {env.master_addr}:{env.master_port} did not answer within "
                    f"{timeout.total_seconds():g} s (train.timeout_s; {exc.strerror or type(exc).__name__}): is "
                    f"rank 0 running, and are MASTER_ADDR/MASTER_PORT its address and port?"
                ) from None
        time.sleep(0.2)


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


# -- errors of the process group as one line ---------------------------------------------
_SOURCE = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")  # "[.../gloo/transport/tcp/pair.cc:545] "
_TIMED_OUT_MS = re.compile(r"Timed out waiting (\d+)ms")


def process_group_failure(exc: BaseException) -> RunFailure | None:
    """The one-line :class:`RunFailure` (exit 1) a process-group error stands for -- a peer
    that did not answer within ``train.timeout_s``, one whose connection broke (it died), a
    rendezvous that did not complete -- or None for any other exception (a bug keeps its
    traceback).  gloo raises plain RuntimeErrors naming its source file; the store and NCCL
    raise torch.distributed's DistError kinds."""
    text = str(exc).strip()
    first = _SOURCE.sub("", text.splitlines()[0] if text else "")
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        env = launcher_env()
        where = f"{env.master_addr}:{env.master_port}" if env.master_addr else "the launcher's store"
        return RendezvousFailure(
            f"the job's {env.world_size} processes could not meet at {where} (rendezvous failed; "
            f"torch: {_cut(first)}); check MASTER_ADDR/MASTER_PORT and that every process was started"
        )
    backend = "gloo" if "gloo" in text.lower() else "nccl" if "nccl" in text.lower() else None
    if not isinstance(exc, RuntimeError) or (backend is None and not isinstance(exc, dist.DistError)):
        return None
    backend = backend or "torch.distributed"
    waited = _TIMED_OUT_MS.search(text)
    if waited or "timed out" in text.lower() or "timeout" in text.lower():
        within = f" within {int(waited.group(1)) / 1000:g} s" if waited else " within train.timeout_s"
        what = f"a peer process did not answer{within}"
    elif "closed" in text.lower() or "reset by peer" in text.lower() or "broken pipe" in text.lower():
        what = "a peer process closed its connection (it ended or was killed)"
    else:
        what = "a collective operation between the processes failed"
    return RunFailure(f"{what} ({backend}: {_cut(first)}); the checkpoints written so far are kept")


def _cut(line: str, limit: int = 160) -> str:
    """gloo's first sentence of advice-free text, at most ``limit`` characters."""
    line = line.split(". This is typically caused", 1)[0].strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."
