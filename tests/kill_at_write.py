"""The training CLI, SIGKILLed right after one chosen write of the run: what the kill-at-any-
instant tests launch in place of launch/train.py (``python tests/kill_at_write.py INSTANT
[train args]``, or the same under ``accelerate launch``).  Product code has no test hooks:
this script wraps distalex's two writers (``atomic_write``, ``append_jsonl``) in its own
process before the CLI runs, and kills the process (rank 0, the one that writes) when the
write named by INSTANT has just completed.

INSTANT (``S``: a step):

* ``row@S``: the step row of S is appended (the step's checkpoint, if any, not written);
* ``checkpoint@S``: the step checkpoint of S is written (one not carrying S's evaluation);
* ``epoch_row@S``: the evaluation (epoch) row of S is appended (curves not redrawn);
* ``curves@S``: curves.png is redrawn after that row (the epoch's checkpoint not written);
* ``epoch_checkpoint@S``: the checkpoint of S carrying S's evaluation row is written;
* ``summary_tmp``: summary.json's temporary file is written, not yet renamed;
* ``summary``: summary.json is written.

An instant the run never reaches lets it finish normally (exit 0): the test sees that.
"""

import importlib
import json
import os
import re
import signal
import struct
import sys
from pathlib import Path

KINDS = ("row", "checkpoint", "epoch_row", "curves", "epoch_checkpoint", "summary_tmp", "summary")
CHECKPOINT = re.compile(r"^step_(\d{9})\.safetensors$")


def carried_step(content) -> int | None:
    """The step of the evaluation row a checkpoint's bytes carry (from its safetensors header)."""
    size = struct.unpack("<Q", content[:8])[0]
    info = json.loads(json.loads(content[8 : 8 + size])["__metadata__"]["distalex"])
    return (info.get("last_eval") or {}).get("step")


def arm(instant: str) -> None:
    kind, _, at = instant.partition("@")
    if kind not in KINDS:
        raise SystemExit(f"unknown instant {instant!r} (one of {', '.join(KINDS)})")
    step = int(at) if at else None
    if os.environ.get("RANK", "0") != "0":
        return  # only the main process writes run files

    import distalex.runtime.io as io

    real_atomic, real_append, real_replace = io.atomic_write, io.append_jsonl, os.replace
    last_row: dict = {}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def append_jsonl(path, row):
        real_append(path, row)
        if Path(path).name != "metrics.jsonl":
            return
        last_row.clear()
        last_row.update(row)
        if row.get("step") == step and kind == ("epoch_row" if "test_acc" in row else "row"):
            die()

    def atomic_write(path, content):
        out = real_atomic(path, content)
        name = Path(path).name
        m = CHECKPOINT.match(name)
        if m and int(m.group(1)) == step and kind in ("checkpoint", "epoch_checkpoint"):
            if kind == ("epoch_checkpoint" if carried_step(content) == step else "checkpoint"):
                die()
        elif name == "curves.png" and kind == "curves" and last_row.get("step") == step:
            die()
        elif name == "summary.json" and kind == "summary":
            die()
        return out

    def replace(src, dst, *args, **kwargs):
        if kind == "summary_tmp" and Path(dst).name == "summary.json":
            die()
        return real_replace(src, dst, *args, **kwargs)

    io.atomic_write, io.append_jsonl, os.replace = atomic_write, append_jsonl, replace
    for name in ("distalex.cli", "distalex.training.trainer"):  # and with them every module that writes
        importlib.import_module(name)

    # Modules that bound the writers by name (``from distalex.runtime.io import ...``) before
    # the patch get the wrapped ones too; modules imported later bind them from io directly.
    for name, module in list(sys.modules.items()):
        if name.startswith("distalex.") and module is not io:
            for attr, real, wrapped in (
                ("atomic_write", real_atomic, atomic_write),
                ("append_jsonl", real_append, append_jsonl),
            ):
                if getattr(module, attr, None) is real:
                    setattr(module, attr, wrapped)


if __name__ == "__main__":
    instant = sys.argv[1]
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    arm(instant)
    from distalex.cli import main

    sys.exit(main())
