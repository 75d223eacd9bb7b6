"""train.threads (distalex/runtime/threads.py): the auto count from the cores a process may use
and the processes on its node, the cgroup quota, the config's bounds, and a guard that every
command sets the count before its process group starts.  Through the launcher:
tests/e2e/test_threads_launcher.py."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distalex.config import MAX_THREADS, load_config
from distalex.errors import ConfigError, LaunchError
from distalex.runtime import threads
from distalex.runtime.launcher import INTEGERS

PACKAGE = Path(__file__).resolve().parents[2] / "distalex"
NO_LAUNCHER = {}  # an environment without any launcher's variables


def job(world: int, local: int | None = None) -> dict:
    """A torchrun environment: rank 0 of ``world`` processes, ``local`` (default all) on this node."""
    env = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    return {**env, "LOCAL_WORLD_SIZE": str(world if local is None else local)}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake machine: ``set(cores=..., quota=..., env=...)`` gives this process that affinity,
    that cgroup v2 quota (in CPUs, None: none) and that launcher environment."""

    real = threads.cgroup_quota

    def set_machine(cores: int, quota: float | None = None, env: dict | None = None):
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        (tmp_path / "cgroup").write_text("0::/job\n")
        (tmp_path / "job").mkdir(exist_ok=True)
        (tmp_path / "job" / "cpu.max").write_text("max 100000\n" if quota is None else f"{int(quota * 1e5)} 100000\n")
        monkeypatch.setattr(threads, "cgroup_quota", lambda: real(tmp_path, tmp_path / "cgroup"))
        for name in (*INTEGERS, "MASTER_ADDR", *threads.MPI_LOCAL_SIZE_VARS):
            monkeypatch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            if value is not None:
                monkeypatch.setenv(name, value)

    return set_machine


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cores", "quota", "env", "expected"),
    [
        (2, None, NO_LAUNCHER, 2),  # this machine under `accelerate launch --num_processes 1`
        (16, None, job(4), 4),  # torchrun / accelerate, 4 processes per node
        (16, None, job(3), 5),  # the remainder is left idle, not oversubscribed
        (2, None, job(4), 1),  # more processes than cores: one each
        (16, None, job(8, local=2), 8),  # 8 processes on 4 nodes: 2 here
        (64, 4.0, NO_LAUNCHER, 4),  # docker --cpus=4 on a 64-core host
        (64, 2.5, NO_LAUNCHER, 3),  # a fractional quota is rounded up
        (8, 0.5, NO_LAUNCHER, 1),
        (4, 32.0, NO_LAUNCHER, 4),  # a quota above the affinity: the affinity binds
        (12, None, {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 6),  # mpirun
        (8, None, {**job(4), "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": None}, 2),  # no local size: ranks 0..3 here
    ],
)
def test_auto_is_the_usable_cores_over_the_local_processes(machine, cores, quota, env, expected):
    machine(cores, quota, env)
    count = threads.plan(0)
    assert count.threads == expected
    assert count.cores == threads.usable_cores(cores, quota) and count.requested == 0


@pytest.mark.parametrize("env", [{"LOCAL_WORLD_SIZE": "many"}, {"LOCAL_RANK": "3"}, {"LOCAL_WORLD_SIZE": "4"}])
def test_a_launcher_environment_that_does_not_add_up_is_refused(machine, env):
    machine(8, None, env)
    with pytest.raises(LaunchError, match="launcher environment"):
        threads.plan(0)


def test_an_explicit_count_is_kept_and_described(machine):
    machine(2)
    count = threads.plan(7)
    assert count.threads == 7
    assert count.describe() == "7 CPU threads per process (train.threads=7; 2 usable cores, 1 process on this node)"
    machine(64, quota=4.0, env=job(2))
    assert threads.plan(0).describe() == (
        "2 CPU threads per process (train.threads=auto: 4 usable cores (cgroup quota 4 CPUs) / 2 processes on this node)"
    )


def test_configure_sets_torchs_count(machine, restore_threads):
    machine(2)
    torch.set_num_threads(1)  # what accelerate launch's OMP_NUM_THREADS=1 leaves
    assert threads.configure(0).threads == 2 and torch.get_num_threads() == 2
    assert threads.configure(1).threads == 1 and torch.get_num_threads() == 1


@settings(max_examples=300, deadline=None)
@given(
    cores=st.integers(1, 512),
    quota=st.none() | st.floats(0.01, 1024.0),
    local=st.integers(1, 1024),
    requested=st.integers(0, MAX_THREADS),
)
def test_auto_shares_the_cores_and_never_gives_zero(cores, quota, local, requested):
    usable = threads.usable_cores(cores, quota)
    assert 1 <= usable <= cores
    if quota is not None:
        assert usable == max(1, min(cores, math.ceil(quota)))
    n = threads.auto_threads(usable, local)
    assert n >= 1
    # Every thread has a core while there are cores for each process, and no core is left
    # idle that a thread more per process would fit on.
    assert n == 1 or n * local <= usable
    assert (n + 1) * local > usable
    assert threads.local_processes(job(local)) == local


@pytest.mark.parametrize(
    ("lines", "files", "expected"),
    [
        ("0::/a/b\n", {"a/b/cpu.max": "max 100000", "a/cpu.max": "150000 100000"}, 1.5),  # an ancestor's
        ("0::/a\n", {"a/cpu.max": "200000 50000"}, 4.0),
        ("0::/\n", {}, None),  # the root: no cpu.max
        ("0::/a\n", {"a/cpu.max": "garbage"}, None),
        # v1, inside a container: the host's path is absent, the mount is the container's cgroup
        ("4:cpu,cpuacct:/docker/x\n", {"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 3.0),
        ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
    ],
)  # fmt: skip
def test_cgroup_quota(tmp_path, lines, files, expected):
    root = tmp_path / "sys"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    (tmp_path / "cgroup").write_text(lines)
    assert threads.cgroup_quota(root, tmp_path / "cgroup") == expected


def test_no_cgroup_file_is_no_quota(tmp_path):
    assert threads.cgroup_quota(tmp_path, tmp_path / "absent") is None


@pytest.mark.parametrize("value", [-1, MAX_THREADS + 1])
def test_config_bounds(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.threads={value}"])
    msg = str(err.value)
    assert msg.startswith("config key 'train.threads'") and f"[0, {MAX_THREADS}]" in msg and f"got {value}" in msg
    assert load_config(None, []).train.threads == 0


def _calls(node) -> list[tuple[int, str]]:
    """(line, dotted callee) of every call under ``node``."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            name = (
                f.id
                if isinstance(f, ast.Name)
                else f"{getattr(f.value, 'id', '?')}.{f.attr}"
                if isinstance(f, ast.Attribute)
                else "?"
            )
            out.append((n.lineno, name))
    return out  # fmt: skip


def test_every_command_sets_the_threads_before_its_accelerator():
    """Guard: a function of distalex/ that makes the accelerator (the process group, the device)
    calls threads.configure first -- otherwise that command computes with what the launcher left."""
    makers = []
    for path in PACKAGE.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name == "make_accelerator":
                continue
            calls = _calls(fn)
            made = [line for line, name in calls if name.endswith("make_accelerator")]
            if made:
                makers.append(f"{path.name}:{fn.name}")
                configured = [line for line, name in calls if name == "threads.configure"]
                assert configured and min(configured) < min(made), f"{path}:{fn.name} makes an accelerator first"
    assert len(makers) >= 2, makers  # training's build_run and evaluation's evaluate_checkpoint
