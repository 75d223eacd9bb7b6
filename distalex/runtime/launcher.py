"""The launcher's environment variables, read and checked in one place.

``accelerate launch`` / ``torchrun`` (and SLURM through launch/slurm_node.py) tell each
process who it is through ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``.  torch and accelerate read them with bare ``int()``
and trust them: ``WORLD_SIZE=abc`` is a ``ValueError`` traceback, ``WORLD_SIZE=2`` without a
launcher (no ``MASTER_ADDR``) one of accelerate's, ``RANK=5`` of 2 waits for ever for peers
that cannot exist, and a ``RANK=1`` left in a plain shell makes a one-process run believe it
is not the main process (it writes no records and prints no error).  :func:`launcher_env`
checks them all -- before accelerate or torch.distributed reads any -- and every reader in
distalex uses its answer.  A bad environment is one :class:`~distalex.errors.LaunchError`
line (exit 2), printed by every process (no rank can be trusted to speak for the others).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from distalex.errors import LaunchError

MAX_PROCESSES = 1 << 20
# The integer variables: name -> (smallest, largest) value.
INTEGERS = {
    "WORLD_SIZE": (1, MAX_PROCESSES),
    "RANK": (0, MAX_PROCESSES - 1),
    "LOCAL_RANK": (0, MAX_PROCESSES - 1),
    "LOCAL_WORLD_SIZE": (1, MAX_PROCESSES),
    "MASTER_PORT": (1, 65535),
    "TORCHELASTIC_RESTART_COUNT": (0, MAX_PROCESSES),
}
_DIGITS = re.compile(r"[0-9]{1,9}")  # no sign, no spaces, no "0x": what every reader parses alike
_HOST = re.compile(r"[A-Za-z0-9._:\[\]%-]{1,255}")  # a host name, IPv4 or (bracketed) IPv6 address
START_HINT = "start a job of several processes with accelerate launch or torchrun (docs/launching.md)"


@dataclass(frozen=True)
class LauncherEnv:
    """Who this process is in its job (a plain ``python`` process: rank 0 of 1)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _shown(value: str) -> str:
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None:
        return None
    lo, hi = INTEGERS[name]
    if not _DIGITS.fullmatch(value) or not lo <= int(value) <= hi:
        raise LaunchError(
            f"launcher environment: {name}={_shown(value)} must be an integer in [{lo}, {hi}]"
            + ("; unset it if no launcher started this process" if name != "MASTER_PORT" else "")
        )
    return int(value)


def launcher_env(env: Mapping[str, str] | None = None) -> LauncherEnv:
    """This process's place in its job, from ``env`` (default ``os.environ``); one
    :class:`LaunchError` naming the variable when the variables are malformed or disagree."""
    env = os.environ if env is None else env
    values = {name: _integer(env, name) for name in INTEGERS}
    world, rank = values["WORLD_SIZE"], values["RANK"]
    local_rank, local_world = values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"]
    size = 1 if world is None else world
    if rank is not None and rank >= size:
        where = f"WORLD_SIZE={world}" if world is not None else "WORLD_SIZE is not set (a job of 1 process)"
        raise LaunchError(
            f"launcher environment: RANK={rank} but {where}: ranks are 0..{size - 1}"
            + ("; a RANK left from another job? unset it, or " + START_HINT if world is None else "")
        )
    if size > 1 and rank is None:
        raise LaunchError(f"launcher environment: WORLD_SIZE={world} but RANK is not set; {START_HINT}")
    if local_world is not None and local_world > size:
        raise LaunchError(f"launcher environment: LOCAL_WORLD_SIZE={local_world} exceeds WORLD_SIZE={size}")
    local_size = local_world if local_world is not None else size
    if local_rank is not None and local_rank >= local_size:
        which = "LOCAL_WORLD_SIZE" if local_world is not None else "WORLD_SIZE"
        raise LaunchError(
            f"launcher environment: LOCAL_RANK={local_rank} but {which}={local_size}: "
            f"local ranks are 0..{local_size - 1}"
        )
    addr = env.get("MASTER_ADDR")
    if addr is not None and not _HOST.fullmatch(addr):
        raise LaunchError(f"launcher environment: MASTER_ADDR={_shown(addr)} is not a host name or address")
    if size > 1 and (addr is None or values["MASTER_PORT"] is None):
        missing = " and ".join(
            n for n, v in (("MASTER_ADDR", addr), ("MASTER_PORT", values["MASTER_PORT"])) if v is None
        )
        raise LaunchError(
            f"launcher environment: WORLD_SIZE={world} RANK={rank} but {missing} not set (no launcher started "
            f"this process?); {START_HINT}, or unset WORLD_SIZE and RANK for one process"
        )
    return LauncherEnv(
        world_size=size,
        rank=rank or 0,
        local_rank=local_rank or 0,
        local_world_size=local_size,
        master_addr=addr,
        master_port=values["MASTER_PORT"],
        restart_count=values["TORCHELASTIC_RESTART_COUNT"] or 0,
    )


def local_processes(env: Mapping[str, str] | None = None) -> int:
    """The job's processes on this node: ``LOCAL_WORLD_SIZE`` where the launcher gives it,
    otherwise at least this process's local ranks 0..LOCAL_RANK (1 without a launcher)."""
    env = os.environ if env is None else env
    job = launcher_env(env)
    if job.world_size == 1:
        return 1
    return job.local_world_size if env.get("LOCAL_WORLD_SIZE") is not None else job.local_rank + 1


def is_main_process() -> bool:
    """Whether this process prints the job's lines (rank 0).  With a bad launcher environment
    every process is (the error must be seen, and no rank can speak for the others)."""
    try:
        return launcher_env().is_main
    except LaunchError:
        return True
