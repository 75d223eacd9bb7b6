"""The launcher's environment variables: read and checked in one place
(distalex/runtime/launcher.py), before accelerate or torch.distributed reads any."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distalex.errors import LaunchError
from distalex.runtime.launcher import INTEGERS, LauncherEnv, launcher_env

PACKAGE = Path(__file__).resolve().parents[2] / "distalex"
LAUNCH = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 RANK=0 but MASTER_ADDR and MASTER_PORT not set"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h"}, "but MASTER_PORT not set"),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' must be an integer in [1, 1048576]"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be an integer in [1, "),
        ({"WORLD_SIZE": " 2"}, "WORLD_SIZE=' 2' must be an integer"),
        ({"WORLD_SIZE": ""}, "WORLD_SIZE='' must be an integer"),
        ({"RANK": "1"}, "RANK=1 but WORLD_SIZE is not set (a job of 1 process): ranks are 0..0; a RANK left from"),
        ({"RANK": "-1"}, "RANK='-1' must be an integer"),
        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be an integer in [0, "),
        ({"WORLD_SIZE": "2", "RANK": "2", **LAUNCH}, "RANK=2 but WORLD_SIZE=2: ranks are 0..1"),
        ({"WORLD_SIZE": "2", **LAUNCH}, "WORLD_SIZE=2 but RANK is not set"),
        ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", **LAUNCH},
         "LOCAL_RANK=2 but LOCAL_WORLD_SIZE=2: local ranks are 0..1"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_WORLD_SIZE": "3", **LAUNCH}, "LOCAL_WORLD_SIZE=3 exceeds WORLD_SIZE=2"),
        ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 but WORLD_SIZE=1"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT='70000' must be"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "a b", "MASTER_PORT": "1"}, "MASTER_ADDR='a b' is not a host"),
        ({"TORCHELASTIC_RESTART_COUNT": "x"}, "TORCHELASTIC_RESTART_COUNT='x' must be an integer"),
        ({"WORLD_SIZE": "\udcff"}, "WORLD_SIZE='\\udcff' must be"),  # a non-UTF-8 byte, as os.environ holds it
    ],
)  # fmt: skip
def test_bad_launcher_environments_are_one_line_naming_the_variable(env, words):
    with pytest.raises(LaunchError) as caught:
        launcher_env(env)
    msg = str(caught.value)
    assert msg.startswith("launcher environment: ") and words in msg and "\n" not in msg, msg


def test_good_launcher_environments():
    assert launcher_env({}) == LauncherEnv()
    assert launcher_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}) == LauncherEnv()
    got = launcher_env(
        {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "2"}
        | LAUNCH
    )
    assert got == LauncherEnv(4, 3, 1, 2, "127.0.0.1", 29500, 2) and not got.is_main
    assert launcher_env({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "[::1]", "MASTER_PORT": "1"}).rank == 1


VALUES = st.one_of(
    st.integers(-5, 70000).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["", " 1", "1 ", "+1", "0x1", "1.0", "1e3", "٣", "abc", "\udcff", "0" * 12, "00", "-0"]),
    st.text(max_size=8),
)
NAMES = [*INTEGERS, "MASTER_ADDR"]
COUNT = {"examples": 0, "accepted": 0}


@settings(max_examples=1500, deadline=None)
@given(env=st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=len(NAMES)), launched=st.booleans())
def test_property_any_launcher_environment_is_accepted_consistently_or_one_launch_error(env, launched):
    """Generated WORLD_SIZE/RANK/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_PORT/MASTER_ADDR values (some
    with a real launcher's address set): accepted with every invariant the readers rely on, or one
    LaunchError line -- never another exception."""
    if launched:
        env = {**LAUNCH, **env}
    COUNT["examples"] += 1
    try:
        got = launcher_env(env)
    except LaunchError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith("launcher environment: "), msg
        return
    COUNT["accepted"] += 1
    assert 0 <= got.rank < got.world_size and 0 <= got.local_rank < got.local_world_size <= got.world_size
    for name, field in (("WORLD_SIZE", "world_size"), ("RANK", "rank"), ("LOCAL_RANK", "local_rank")):
        if name in env:  # what torch and accelerate will read with int() is what distalex read
            assert int(env[name]) == getattr(got, field)
    if got.world_size > 1:
        assert got.master_addr and 1 <= got.master_port <= 65535 and "RANK" in env


def test_property_counts():
    if COUNT["examples"] == 0:
        pytest.skip("the property test did not run in this session")
    print(f"launcher fuzz: {COUNT}")
    assert 0 < COUNT["accepted"] < COUNT["examples"]


def test_only_the_launcher_module_reads_launcher_variables():
    """Guard: a launcher variable is read in distalex/runtime/launcher.py only (everything else asks
    launcher_env()), so no reader can trust an unchecked value."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "runtime/launcher.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in NAMES:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert found == [], found
