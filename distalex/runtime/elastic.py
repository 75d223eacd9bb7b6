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


def init_for_restarts(timeout: timedelta, cuda: bool) -> bool:
    """Start the default group on an attempt-prefixed store; True if it did.  A no-op
    without a torchrun agent's store (plain python, other launchers) or when a group
    exists."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return False
    world_size = int(env["WORLD_SIZE"])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)
    attempt = restart_count()
    dist.init_process_group(
        backend="nccl" if cuda and torch.cuda.is_available() else "gloo",
        store=dist.PrefixStore(f"/worker/attempt_{attempt}", store),
        rank=int(env["RANK"]),
        world_size=world_size,
        timeout=timeout,
    )
    return True


def restart_count() -> int:
    """How many times the launcher has restarted the workers (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
