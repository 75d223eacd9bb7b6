"""The CPU threads each process computes with: ``train.threads``, applied at start-up.

Launchers choose a thread count for their children and write it into
``OMP_NUM_THREADS``: ``accelerate launch`` writes 1 unless it was given a
number (or, with ``--cpu``, its own guess from the physical cores), torchrun
writes 1 for more than one process per node.  A child therefore cannot tell a
user's ``OMP_NUM_THREADS=1`` from a launcher's default, and a one-process CPU
run started the way the README shows trained on one of the machine's cores.  So
the count is the config's, not the environment's: :func:`configure` sets it
(``torch.set_num_threads``) whoever started the process.

``train.threads=0`` (the default, "auto") is the cores this process may use
divided by the processes of the job on this node, at least 1.  The cores it may
use are its CPU affinity (``os.sched_getaffinity``: taskset, a container's
cpuset, Slurm's binding of the whole job step) capped by a cgroup CPU quota
(``docker --cpus``, Kubernetes CPU limits), rounded up: a quota of 1.5 CPUs lets
2 threads use all of it.  Auto assumes the local processes share that set; a
launcher that binds each process to its own cores (``accelerate launch
--enable_cpu_affinity``) already divided them, and then ``train.threads`` says
how many each gets.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from distalex.errors import DistalexError
from distalex.runtime import launcher
from distalex.runtime.io import read_bytes
from distalex.runtime.launcher import MAX_PROCESSES, launcher_env

# MPI launchers' variables for the processes of the job on this node (accelerate's launcher
# reads these too); torchrun's (accelerate's multi-process launcher) come checked from
# distalex/runtime/launcher.py.
MPI_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadCount:
    threads: int  # what torch computes with in this process
    requested: int  # train.threads (0: auto)
    cores: int  # the cores this process may use
    local_processes: int  # the job's processes on this node
    quota: float | None = None  # the cgroup CPU quota in CPUs, None: none

    def describe(self) -> str:
        """The start-up line's part: how many threads, and why that many."""
        limit = f"{self.cores} usable core{'s' if self.cores != 1 else ''}"
        if self.quota is not None:
            limit += f" (cgroup quota {self.quota:g} CPUs)"
        local = f"{self.local_processes} process{'es' if self.local_processes != 1 else ''} on this node"
        plural = "s" if self.threads != 1 else ""
        if self.requested:
            return f"{self.threads} CPU thread{plural} per process (train.threads={self.requested}; {limit}, {local})"
        return f"{self.threads} CPU thread{plural} per process (train.threads=auto: {limit} / {local})"


def auto_threads(cores: int, local_processes: int) -> int:
    """The auto count: the cores shared out over the local processes, at least 1 each."""
    return max(1, cores // max(1, local_processes))


def usable_cores(affinity: int, quota: float | None) -> int:
    """The cores a process may use: its affinity, capped by the cgroup quota rounded up."""
    if quota is None:
        return max(1, affinity)
    return max(1, min(affinity, math.ceil(quota)))


def local_processes(env=None) -> int:
    """The job's processes on this node, as the launcher says (1 without a launcher); a
    launcher environment that does not add up is a LaunchError (distalex/runtime/launcher.py)."""
    env = os.environ if env is None else env
    if launcher_env(env).world_size > 1:
        return launcher.local_processes(env)
    for name in MPI_LOCAL_SIZE_VARS:
        value = env.get(name, "")
        if value.isdigit() and 0 < int(value) <= MAX_PROCESSES:
            return int(value)
    return 1


def affinity_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup or an ancestor's, None: no quota (or none
    readable).  cgroup v2: ``cpu.max`` ("max 100000" or "150000 100000"); v1:
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none)."""
    lines = _small_text(self_cgroup, 1 << 16)
    if lines is None:
        return None
    lines = lines.splitlines()
    limits = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = Path(path.lstrip("/"))
        if controllers == "":  # v2, the unified hierarchy
            for d in _dirs_up(root, rel):
                limits.append(_v2_limit(d / "cpu.max"))
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                for d in _dirs_up(mount, rel):
                    limits.append(_v1_limit(d))
    limits = [q for q in limits if q is not None]
    return min(limits) if limits else None


def _small_text(path: Path, max_bytes: int = 64) -> str | None:
    """A kernel interface file's text through the guarded reader; None where it is absent or unusable."""
    try:
        return read_bytes(path, what="cgroup CPU limit", max_bytes=max_bytes).decode("ascii", "replace")
    except DistalexError:
        return None


def _dirs_up(mount: Path, rel: Path):
    """``mount/rel`` and its parents up to ``mount``: an ancestor's limit binds too.  (Inside a
    container the cgroup path may be the host's and absent: then the mount itself is ours.)"""
    d = mount / rel
    while True:
        yield d
        if d == mount or mount not in d.parents:
            return
        d = d.parent


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = (_small_text(path) or "").split()[:2]
        return None if quota == "max" else _ratio(int(quota), int(period))
    except ValueError:
        return None


def _v1_limit(d: Path) -> float | None:
    try:
        quota = int(_small_text(d / "cpu.cfs_quota_us") or "")
        period = int(_small_text(d / "cpu.cfs_period_us") or "")
    except ValueError:
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


def plan(requested: int, env=None) -> ThreadCount:
    """What ``train.threads=requested`` means in this process (nothing is set)."""
    quota = cgroup_quota()
    cores = usable_cores(affinity_cores(), quota)
    local = local_processes(env)
    threads = requested or auto_threads(cores, local)
    return ThreadCount(threads=threads, requested=requested, cores=cores, local_processes=local, quota=quota)


def configure(requested: int) -> ThreadCount:
    """Set this process's thread count from ``train.threads`` (0: auto), whatever launched it.
    Called first thing by each command (before the process group and any tensor work)."""
    count = plan(requested)
    torch.set_num_threads(count.threads)
    try:
        # Inter-op threads (torch.jit.fork, some backward work) can be set only once per
        # process and only before any inter-op work ran; a second run in one process keeps them.
        torch.set_num_interop_threads(count.threads)
    except RuntimeError:
        pass
    return count
