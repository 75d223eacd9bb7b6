"""The output dir a run owns: what counts as a run there, and when it may be reused."""

from __future__ import annotations

import shutil
from pathlib import Path

from distalex.errors import RunDirError

RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "checkpoints")


def prepare_output_dir(cfg, resume_path, is_main: bool) -> None:
    """Refuse an output dir that holds another run unless resuming or ``train.overwrite``; clear it for overwrite."""
    out = Path(cfg.train.output_dir)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume_path is not None or not existing:
        return
    if not cfg.train.overwrite:
        why = "no checkpoint to resume from" if cfg.train.resume == "auto" else "train.resume is unset"
        raise RunDirError(
            f"train.output_dir '{out}' already holds a run ({', '.join(existing)}; {why}); "
            f"pass train.resume=auto to continue it or train.overwrite=true to replace it"
        )
    if is_main:
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
