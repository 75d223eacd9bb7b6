"""Checkpoints never execute code from the file (a real malicious pickle, crafted
safetensors files), the run-dir lock, and the I/O module's failure handling --
in-process, fast.  The same cases through the CLI are in tests/e2e/test_run_lifecycle.py."""

import errno
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save

from distalex.errors import CheckpointError, RunDirError, WriteError
from distalex.model.alexnet import AlexNet, AlexNetSpec
from distalex.runtime.io import atomic_write, read_jsonl, remove_stale_temps
from distalex.runtime.rundir import LOCK_NAME, claim_output_dir
from distalex.training import checkpoint

SPEC = AlexNetSpec(image_size=67, width=0.125)


class Payload:
    """Unpickling this runs ``open(marker, 'w').write('pwned')``: what an attacker's file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def malicious_checkpoint(path, marker):
    """A torch.save file shaped like an old distalex checkpoint, with the payload inside."""
    torch.save({"format": 1, "model": {"w": torch.ones(2)}, "evil": Payload(marker)}, path)
    return path


def test_the_malicious_file_is_real(tmp_path):
    """Unpickled the old way (weights_only=False) the file does write the marker: so the
    tests below that see no marker prove the loader refused it, not that the payload is inert."""
    marker = tmp_path / "marker"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("name", ["evil.pt", "step_000000009.safetensors"])
def test_load_reference_and_read_refuse_a_malicious_pickle(tmp_path, name):
    marker = tmp_path / "marker"
    path = malicious_checkpoint(tmp_path / name, marker)
    for load in (checkpoint.load_reference, checkpoint.read):
        with pytest.raises(CheckpointError) as info:
            load(str(path))
        msg = str(info.value)
        assert "cannot be read" in msg and "pickle" in msg and "\n" not in msg
    assert not marker.exists()


def real_state(width=0.125):
    """A complete state dict, as a run builds it (reference tensors, RNG, position ...)."""
    spec = AlexNetSpec(image_size=67, width=width)
    model = AlexNet(spec)
    return {
        "format": checkpoint.FORMAT,
        "spec": {**spec.__dict__},
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "momentum": {},
        "schedule": {"lr": 0.1, "best": float("inf"), "bad_epochs": 0, "reductions": 0, "kind": "constant"},
        "scaler": None,
        "rng": [{"cpu": torch.get_rng_state()}],
        "position": {"epoch": 1, "batch": 2, "step": 12},
        "stats": {"meter": {"loss_sum": 1.5, "correct": 3.0, "seen": 64.0, "train_time": 0.5}, "totals": {
            "train_examples": 320.0, "train_time": 1.0, "wall_time": 2.0}},
        "last_eval": {"step": 10, "loss": 2.25, "test_acc": 0.125},
        "config": {"train": {"batch_size": 32}},
        "placement": {"split_mode": "single", "world_size": 1, "replicas": 1, "towers": 1},
    }  # fmt: skip


def test_round_trip_is_exact(tmp_path):
    saved = real_state()
    path = checkpoint.write(saved, str(tmp_path), 12, keep=3)
    assert path.name == "step_000000012.safetensors"
    back = checkpoint.read(path)
    assert all(torch.equal(saved["model"][k], back["model"][k]) for k in saved["model"])
    assert torch.equal(back["rng"][0]["cpu"], saved["rng"][0]["cpu"])
    for key in ("position", "stats", "last_eval", "config", "placement", "spec"):
        assert back[key] == saved[key], key
    assert back["schedule"]["best"] == float("inf")
    model = checkpoint.load_reference(str(path))
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())


def crafted(tmp_path, info=None, tensors=None, meta=None, name="crafted.safetensors"):
    """A safetensors file with the given metadata JSON (or raw metadata) and tensors."""
    good = real_state()
    if tensors is None:
        tensors = {f"model/{k}": v.contiguous() for k, v in good["model"].items()}
        tensors["rng/0/cpu"] = torch.get_rng_state()
    if meta is None:
        if info is None:
            info = {k: v for k, v in good.items() if k not in ("model", "momentum", "rng")}
            info["rng_ranks"] = 1
        meta = {checkpoint.META_KEY: json.dumps(info)}
    path = tmp_path / name
    path.write_bytes(save(tensors, metadata=meta))
    return path


def _info(**changes):
    info = {k: v for k, v in real_state().items() if k not in ("model", "momentum", "rng")}
    info["rng_ranks"] = 1
    for key, value in changes.items():
        if value is None:
            info.pop(key)
        else:
            info[key] = value
    return info


@pytest.mark.parametrize(
    ("case", "kwargs", "needle"),
    [
        ("no metadata", {"meta": {}}, "no distalex metadata"),
        ("metadata not JSON", {"meta": {"distalex": "{not json"}}, "not JSON"),
        ("metadata a list", {"meta": {"distalex": "[1, 2]"}}, "not a JSON object"),
        ("another format", {"info": _info(format=7)}, "format 7"),
        ("position missing", {"info": _info(position=None)}, "metadata: position must be present"),
        ("position a string", {"info": _info(position={"epoch": "0", "batch": 0, "step": 1})}, "position.epoch must be an int"),
        ("position negative", {"info": _info(position={"epoch": 0, "batch": -5, "step": 1})}, "position.batch must be an int in [0, "),
        ("extra position key", {"info": _info(position={"epoch": 0, "batch": 0, "step": 1, "x": 1})}, "position.x must be absent (unknown key"),
        ("schedule lr a string", {"info": _info(schedule={"lr": "1", "best": 1, "bad_epochs": 0, "reductions": 0})},
         "schedule.lr must be a finite number"),
        ("bool for an int", {"info": _info(rng_ranks=True)}, "rng_ranks must be an int in [1, "),
        ("no model tensors", {"tensors": {"rng/0/cpu": torch.get_rng_state()}}, "no model tensors"),
        ("stray tensor", {"tensors": {"model/x": torch.ones(1), "evil": torch.ones(1)}}, "unexpected tensor"),
        ("rng of a rank too many", {"tensors": {"model/x": torch.ones(1), "rng/3/cpu": torch.ones(1)}}, "rank 3"),
        ("rng of the wrong dtype", {"tensors": {"model/x": torch.ones(1), "rng/0/cpu": torch.ones(1)}}, "RNG"),
    ],
)  # fmt: skip
def test_crafted_safetensors_are_refused_with_one_line(tmp_path, case, kwargs, needle):
    path = crafted(tmp_path, **kwargs)
    with pytest.raises(CheckpointError) as info:
        checkpoint.read(path)
    msg = str(info.value)
    assert needle in msg and str(path) in msg and "\n" not in msg, (case, msg)


def test_a_crafted_spec_cannot_make_load_reference_allocate(tmp_path):
    """The spec says width 10000 (terabytes of weights); the tensors are the tiny net's.
    The shapes are compared on the meta device first: refused at once, nothing allocated."""
    info = _info(spec={**real_state()["spec"], "width": 10000.0})
    path = crafted(tmp_path, info=info)
    with pytest.raises(CheckpointError, match="do not match its network spec"):
        checkpoint.load_reference(str(path))
    info = _info(spec={**real_state()["spec"], "evil": 1})
    with pytest.raises(CheckpointError, match="metadata: spec.evil must be absent"):  # the schema's unknown key
        checkpoint.load_reference(str(crafted(tmp_path, info=info)))


def state_at(step):
    """A real state whose stored step is ``step`` (what a checkpoint named for it stores)."""
    state = real_state()
    state["position"]["step"] = step
    state["last_eval"]["step"] = min(state["last_eval"]["step"], step)  # never a row of a later step
    return state


def test_truncated_and_directory_and_legacy(tmp_path):
    path = checkpoint.write(state_at(3), str(tmp_path), 3, keep=3)
    data = path.read_bytes()
    for cut in (10, 1000, len(data) - 7):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cannot be read"):
            checkpoint.read(bad)
    with pytest.raises(CheckpointError, match="is a directory"):
        checkpoint.read(tmp_path)
    with pytest.raises(CheckpointError, match="is a directory"):
        checkpoint.resolve(str(tmp_path), str(tmp_path))


def test_resume_auto_skips_unreadable_newest_and_keeps_it(tmp_path):
    out = str(tmp_path)
    checkpoint.write(state_at(3), out, 3, keep=5)
    newest = checkpoint.write(state_at(6), out, 6, keep=5)
    newest.write_bytes(newest.read_bytes()[:500])
    warnings = []
    path, saved = checkpoint.resolve("auto", out, warn=warnings.append)
    assert path.name == "step_000000003.safetensors" and saved["position"]["step"] == 3
    assert len(warnings) == 1 and "step_000000006.safetensors" in warnings[0] and "step_000000003" in warnings[0]
    assert newest.exists(), "the unreadable checkpoint is left in place"
    # explicitly named, the same file is refused
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.resolve(str(newest), out)
    # none readable: refused, naming the newest
    (tmp_path / "checkpoints" / "step_000000003.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        checkpoint.resolve("auto", out, warn=warnings.append)


def test_resume_auto_with_only_pickle_checkpoints_says_why(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "checkpoints").mkdir()
    malicious_checkpoint(tmp_path / "checkpoints" / "step_000000005.pt", marker)
    with pytest.raises(CheckpointError, match="only pickle checkpoints"):
        checkpoint.resolve("auto", str(tmp_path))
    assert not marker.exists()


# -- the run-dir lock -----------------------------------------------------------------------
def main_process():
    return SimpleNamespace(is_main=True, any_rank=lambda flag: flag)


def cfg_for(out):
    return SimpleNamespace(train=SimpleNamespace(output_dir=str(out)))


def test_lock_is_exclusive_names_holder_and_is_released(tmp_path):
    out = tmp_path / "runs" / "run"
    first = claim_output_dir(cfg_for(out).train, main_process())
    holder = (out / LOCK_NAME).read_text()
    assert f"pid {os.getpid()}" in holder
    with pytest.raises(RunDirError) as info:
        claim_output_dir(cfg_for(out).train, main_process())  # flock: a second open file conflicts, even in-process
    msg = str(info.value)
    assert "in use by another run" in msg and f"pid {os.getpid()}" in msg and os.uname().nodename in msg
    first.release()
    assert not (tmp_path / "runs").exists(), "a run that wrote nothing leaves nothing behind"
    again = claim_output_dir(cfg_for(out).train, main_process())
    again.release()


def test_lock_of_a_killed_holder_is_free(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, types
        from distalex.runtime.rundir import claim_output_dir
        cfg = types.SimpleNamespace(train=types.SimpleNamespace(output_dir={str(out)!r}))
        claim_output_dir(cfg.train, types.SimpleNamespace(is_main=True, any_rank=lambda f: f))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (out / LOCK_NAME).exists()  # stale: the file stays, the lock went with the process
    claim_output_dir(cfg_for(out).train, main_process()).release()


def test_stale_temporary_files_are_removed_by_the_owner(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".summary.json.4242.tmp", tmp_path / "checkpoints" / ".step_000000003.safetensors.77.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    keep = tmp_path / "notes.tmp"
    keep.write_text("mine")
    claim_output_dir(cfg_for(tmp_path).train, main_process()).release()
    assert not any(p.exists() for p in stale) and keep.exists()
    assert remove_stale_temps(tmp_path / "nowhere") == []


# -- I/O failures --------------------------------------------------------------------------
def test_failed_atomic_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def full_disk(fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as info:
        atomic_write(target, full_disk)
    assert str(info.value) == f"cannot write '{target}': the disk is full (ENOSPC: No space left on device)"
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        read_jsonl(path)
