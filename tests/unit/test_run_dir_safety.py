"""The run dir against what a user (or another program) leaves in it: pruning and
``resume=auto`` touch only distalex's own checkpoints, and no write follows a planted
symbolic link or lands in a special file.  Fast, in-process (docs/failures.md)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distalex.errors import RunDirError, WriteError
from distalex.model.alexnet import AlexNetSpec
from distalex.runtime.io import append_jsonl, atomic_write, write_json
from distalex.runtime.rundir import LOCK_NAME, claim_output_dir
from distalex.training import checkpoint


def tiny_state(step: int) -> dict:
    """A complete distalex state (every field ``read`` checks) with one small tensor."""
    return {
        "format": checkpoint.FORMAT,
        "spec": dict(AlexNetSpec().__dict__),
        "model": {"w": torch.arange(4.0)},
        "momentum": {},
        "schedule": {"lr": 0.1, "best": 1.0, "bad_epochs": 0, "reductions": 0, "kind": "constant"},
        "scaler": None,
        "rng": [{"cpu": torch.get_rng_state()}],
        "position": {"epoch": 0, "batch": step, "step": step},
        "stats": {
            "meter": {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "train_time": 0.0},
            "totals": {"train_examples": 0.0, "train_time": 0.0, "wall_time": 0.0},
        },
        "last_eval": {},
        "classes": None,
        "config": {},
        "placement": {"split_mode": "single", "world_size": 1, "replicas": 1, "towers": 1},
    }


def name(step: int) -> str:
    return f"step_{step:09d}.safetensors"


def ckpt_bytes(step: int) -> bytes:
    return checkpoint.encode(tiny_state(step))


def main_process():
    return SimpleNamespace(is_main=True, any_rank=lambda flag: flag)


def claim(out):
    return claim_output_dir(SimpleNamespace(output_dir=str(out)), main_process())


def no_block(fn, *args):
    """Run ``fn`` in a thread; fail (instead of hanging) if it blocks, e.g. on a FIFO."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), f"{fn.__name__} blocked"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- class 1: pruning and resume=auto trust only distalex's checkpoints ----------------------
def test_issue_junk_named_like_the_newest_checkpoint_is_never_pruned_into(tmp_path, capsys):
    """The issue's example: junk ``step_999999999.safetensors`` and keep=1 used to make
    every save prune the checkpoint it had just written."""
    out = str(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    junk = tmp_path / "checkpoints" / name(999999999)
    junk.write_bytes(b"not a checkpoint")
    for step in (1, 2, 3):
        final = checkpoint.write(tiny_state(step), out, step, keep=1)
        assert final.is_file() and checkpoint.read(final)["position"]["step"] == step
    assert checkpoint.list_checkpoints(out) == [tmp_path / "checkpoints" / name(3)]
    assert junk.read_bytes() == b"not a checkpoint"
    lines = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(lines) == 1 and str(junk) in lines[0], "one warning, once per run, naming the file"
    warnings = []
    path, saved = checkpoint.resolve("auto", out, warn=warnings.append)
    assert path.name == name(3) and saved["position"]["step"] == 3
    assert len(warnings) == 1 and name(999999999) in warnings[0]


def test_a_resumed_run_names_the_junk_once(tmp_path):
    """resume=auto names the skipped junk; the saves that follow in the same run do not repeat it."""
    out = str(tmp_path)
    checkpoint.write(tiny_state(1), out, 1, keep=1, warn=pytest.fail)
    (tmp_path / "checkpoints" / name(9)).write_bytes(b"junk")
    warnings = []
    path, _ = checkpoint.resolve("auto", out, warn=warnings.append)
    assert path.name == name(1) and len(warnings) == 1 and name(9) in warnings[0]
    checkpoint.write(tiny_state(2), out, 2, keep=1, warn=warnings.append)
    assert len(warnings) == 1 and checkpoint.list_checkpoints(out) == [tmp_path / "checkpoints" / name(2)]


@pytest.mark.parametrize("kind", ["directory", "fifo", "other_step", "truncated", "symlink", "junk"])
def test_entries_with_a_checkpoints_name_are_left_alone(tmp_path, kind):
    out = str(tmp_path)
    d = tmp_path / "checkpoints"
    d.mkdir()
    checkpoint.write(tiny_state(1), out, 1, keep=1)
    planted = d / name(5)
    users = tmp_path / "users_file"
    users.write_bytes(ckpt_bytes(5))
    if kind == "directory":
        planted.mkdir()
    elif kind == "fifo":
        os.mkfifo(planted)
    elif kind == "other_step":
        planted.write_bytes(ckpt_bytes(4))  # readable, but stores step 4
    elif kind == "truncated":
        planted.write_bytes(ckpt_bytes(5)[:-3])
    elif kind == "symlink":
        planted.symlink_to(users)  # a valid checkpoint, behind a link
    else:
        planted.write_bytes(b"\x00" * 100)
    before = planted.lstat()
    final = no_block(checkpoint.write, tiny_state(2), out, 2, 1, lambda _line: None)
    assert final.is_file() and checkpoint.read(final)["position"]["step"] == 2
    assert not (d / name(1)).exists(), "the real older checkpoint is still pruned"
    after = planted.lstat()
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    assert users.read_bytes() == ckpt_bytes(5)
    warnings = []
    path, _ = no_block(checkpoint.resolve, "auto", out, warnings.append)
    assert path == final and len(warnings) == 1 and name(5) in warnings[0]


def test_header_reads_are_bounded(tmp_path):
    big = tmp_path / name(1)
    big.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")  # claims a 1 TiB header
    with pytest.raises(ValueError, match="no safetensors header"):
        checkpoint.header_step(big)


# -- property: whatever checkpoints/ holds, a save keeps what it must -----------------------
STEPS = [1, 2, 3, 5, 8, 999999999]
NAMES = [name(s) for s in STEPS] + [
    "step_5.safetensors",
    "step_000000005.safetensors.bak",
    "notes.txt",
    "step_00000000a.safetensors",
    "STEP_000000002.safetensors",
]
KINDS = ["valid", "other_step", "junk", "truncated", "directory", "symlink", "fifo"]
_BYTES: dict[int, bytes] = {}


def cached_bytes(step: int) -> bytes:
    if step not in _BYTES:
        _BYTES[step] = ckpt_bytes(step)
    return _BYTES[step]


def make(path: Path, kind: str, outside: Path) -> None:
    m = checkpoint.NAME.match(path.name)
    step = int(m.group(1)) if m else 7
    if kind == "valid":
        path.write_bytes(cached_bytes(step))
    elif kind == "other_step":
        path.write_bytes(cached_bytes(step + 1))
    elif kind == "junk":
        path.write_bytes(b"junk " + path.name.encode())
    elif kind == "truncated":
        path.write_bytes(cached_bytes(step)[:-1])
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        target = outside / f"target_{path.name}"
        target.write_bytes(cached_bytes(step))
        path.symlink_to(target)
    else:
        os.mkfifo(path)


def snapshot(path: Path):
    st_ = path.lstat()
    kind = stat.S_IFMT(st_.st_mode)
    content = None
    if stat.S_ISREG(st_.st_mode):
        content = path.read_bytes()
    elif stat.S_ISLNK(st_.st_mode):
        content = (os.readlink(path), Path(os.readlink(path)).read_bytes())
    return kind, st_.st_ino, content


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.dictionaries(st.sampled_from(NAMES), st.sampled_from(KINDS), max_size=7),
    step=st.sampled_from([4, 6, 7, 9]),
    keep=st.integers(1, 3),
)
def test_property_a_save_keeps_itself_at_most_keep_and_nothing_foreign(entries, step, keep):
    assume(name(step) not in entries)
    root = Path(tempfile.mkdtemp())
    try:
        out, outside = root / "run", root / "outside"
        (out / "checkpoints").mkdir(parents=True)
        outside.mkdir()
        for n, kind in entries.items():
            make(out / "checkpoints" / n, kind, outside)
        ours = {n for n, kind in entries.items() if kind == "valid" and checkpoint.NAME.match(n)}
        foreign = {n: snapshot(out / "checkpoints" / n) for n in entries if n not in ours}
        final = no_block(checkpoint.write, tiny_state(step), str(out), step, keep, lambda _line: None)
        assert final.name == name(step) and checkpoint.read(final)["position"]["step"] == step
        left = {p.name for p in (out / "checkpoints").iterdir()}
        remaining = (ours & left) | {final.name}
        assert len(remaining) <= keep
        expected = {final.name} | set(sorted(ours)[len(ours) - (keep - 1) :] if keep > 1 else [])
        assert remaining == expected, "the newest keep-1 others are kept, the rest pruned"
        for n, snap in foreign.items():
            assert snapshot(out / "checkpoints" / n) == snap, f"{n} ({entries[n]}) was touched"
    finally:
        shutil.rmtree(root)


# -- class 2: no write follows a planted link or lands in a special file --------------------
def test_issue_lock_symlink_to_a_users_file_is_refused_and_the_file_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    users = tmp_path / "thesis.tex"
    users.write_text("years of work\n")
    (out / LOCK_NAME).symlink_to(users)
    with pytest.raises(RunDirError) as info:
        claim(out)
    msg = str(info.value)
    assert "'.lock' is a symbolic link" in msg and "\n" not in msg
    assert users.read_text() == "years of work\n"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], "nothing written"


@pytest.mark.parametrize("run_file", ["metrics.jsonl", "summary.json", "curves.png", "checkpoints"])
def test_symlinked_run_files_are_refused_at_start_up(tmp_path, run_file):
    out = tmp_path / "run"
    out.mkdir()
    users = tmp_path / "users"
    users.mkdir() if run_file == "checkpoints" else users.write_text("mine\n")
    (out / run_file).symlink_to(users)
    with pytest.raises(RunDirError, match=f"'{run_file}' is a symbolic link"):
        claim(out)
    assert not (out / LOCK_NAME).exists()
    assert run_file == "checkpoints" or users.read_text() == "mine\n"


@pytest.mark.parametrize("special", ["metrics.jsonl", LOCK_NAME])
def test_fifo_where_a_run_file_is_expected_is_refused_without_blocking(tmp_path, special):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / special)
    with pytest.raises(RunDirError, match="is a FIFO"):
        no_block(claim, out)


def test_writes_during_the_run_never_follow_a_link(tmp_path):
    """Links planted after start-up: each writer refuses with a WriteError, the target kept."""
    users = tmp_path / "users"
    users.write_text("mine\n")
    (tmp_path / "metrics.jsonl").symlink_to(users)
    with pytest.raises(WriteError, match="is a symbolic link"):
        append_jsonl(tmp_path / "metrics.jsonl", {"step": 1})
    (tmp_path / "summary.json").symlink_to(users)
    with pytest.raises(WriteError, match="is a symbolic link"):
        write_json(tmp_path / "summary.json", {"loss": 1.0})
    # the temporary name of the next checkpoint, pre-created as a link
    (tmp_path / "checkpoints").mkdir()
    tmp = tmp_path / "checkpoints" / f".{name(3)}.{os.getpid()}.tmp"
    tmp.symlink_to(users)
    with pytest.raises(WriteError, match="is a symbolic link"):
        checkpoint.write(tiny_state(3), str(tmp_path), 3, keep=1)
    # the checkpoint's own name as a link
    (tmp_path / "checkpoints" / name(4)).symlink_to(users)
    with pytest.raises(WriteError, match="is a symbolic link"):
        checkpoint.write(tiny_state(4), str(tmp_path), 4, keep=1)
    assert users.read_text() == "mine\n" and tmp.is_symlink()
    assert not (tmp_path / "checkpoints" / name(3)).exists()


def test_fifo_and_device_during_the_run_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "metrics.jsonl")
    with pytest.raises(WriteError, match="is a FIFO"):
        no_block(append_jsonl, tmp_path / "metrics.jsonl", {"step": 1})
    (tmp_path / "summary.json").symlink_to("/dev/null")
    with pytest.raises(WriteError, match="is a symbolic link"):
        atomic_write(tmp_path / "summary.json", "{}")
    # a temp name that exists as a regular file is not written through either (O_EXCL)
    (tmp_path / f".x.json.{os.getpid()}.tmp").write_text("someone's")
    with pytest.raises(WriteError, match="File exists"):
        atomic_write(tmp_path / "x.json", "{}")
    assert (tmp_path / f".x.json.{os.getpid()}.tmp").read_text() == "someone's"
