"""Starting the process group so that a launcher's restart works.

``torchrun --max-restarts N`` / ``accelerate launch --max_restarts N`` restart
every worker after one fails.  The launcher's agent hosts the rendezvous store
and keeps it across attempts; torch (checked with 2.14) connects the workers of
every attempt to that store under the same keys, so a restarted attempt can read
the dead attempt's addresses ("Connection refused" in gloo's connectFullMesh,
a hang in NCCL's) and never starts.  Earlier torch releases kept each attempt's
keys apart with a prefix naming the attempt; :func:`init_for_restarts` does the
same: on a launch that uses the agent's store it starts the default process
group itself, on ``/worker/attempt_<TORCHELASTIC_RESTART_COUNT>``, before
accelerate (which then adopts the group instead of creating one).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from distalex.runtime.launcher import launcher_env


def init_for_restarts(timeout: timedelta, cuda: bool) -> bool:
    """Start the default group on an attempt-prefixed store; True if it did.  A no-op
    without a torchrun agent's store (plain python, other launchers) or when a group
    exists."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return False
    env = launcher_env()  # checked: a multi-process job has MASTER_ADDR, MASTER_PORT and RANK
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    dist.init_process_group(
        backend="nccl" if cuda and torch.cuda.is_available() else "gloo",
        store=dist.PrefixStore(f"/worker/attempt_{env.restart_count}", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    return True


def restart_count() -> int:
    """How many times the launcher has restarted the workers (0 on the first attempt)."""
    return launcher_env().restart_count
