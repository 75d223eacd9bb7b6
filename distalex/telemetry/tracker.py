"""wandb through accelerate: start, log, finish -- and never stop training.

Project ``tracking.project``; run name ``<experiment>-<split>-<W>x<device>-<precision>``
(or ``tracking.run_name``); group ``tracking.group`` or the experiment; job_type the
split mode; config the run facts (split_mode, world_size, replicas, towers,
mixed_precision, global_batch, device) plus the full experiment config under
``config``; history: every metrics.jsonl row at its step, its figures under ``step/...``
(a logged step's row) or ``epoch/...`` (an epoch's row; :func:`wandb_figures`); the run's
summary gets summary.json.  Without credentials (no
``WANDB_API_KEY``, no api.wandb.ai in ~/.netrc) and without ``WANDB_MODE`` the run
is offline: files under ``<output_dir>/wandb/offline-run-*`` (``$WANDB_DIR/wandb/``
when WANDB_DIR is set), uploadable later with ``wandb sync``.

A tracker that fails (unwritable directory, wandb missing or broken, init or log
raising) prints ONE warning line and is dropped; training continues on the local
records (:mod:`distalex.telemetry.records`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from distalex.errors import DistalexError
from distalex.runtime.io import read_bytes


def has_wandb_credentials() -> bool:
    """An API key in the environment, or a ~/.netrc ($NETRC) entry for the wandb
    host (api.wandb.ai, or $WANDB_BASE_URL's for a self-hosted server)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return host in read_bytes(netrc, what="netrc file", max_bytes=1 << 20).decode("utf-8")
    except (DistalexError, UnicodeDecodeError):
        return False


def run_name(cfg, world_size: int, device_name: str, precision: str) -> str:
    """``precision``: the one the run uses ("auto" resolved)."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    device = device_name.replace(" ", "-").lower()
    return f"{cfg.experiment}-{cfg.split_mode}-{world_size}x{device}-{_precision(precision)}"


class WandbTracker:
    """The wandb run of the main process, through accelerate's tracking API."""

    def __init__(self, output_dir: Path, accelerator, metrics_path: Path):
        self.dir = Path(output_dir)
        self.accelerator = accelerator
        self.metrics_path = metrics_path  # named in the warning: where the figures still go
        self.on = False

    def wandb_dir(self) -> Path:
        """Where wandb puts its ``wandb/`` folder: $WANDB_DIR, else the run's output dir."""
        return Path(os.environ.get("WANDB_DIR") or self.dir)

    def start(self, cfg, run_config: dict, name: str) -> None:
        if not (cfg.tracking.wandb and self.accelerator is not None):
            return
        if not any(_is_wandb(t) for t in getattr(self.accelerator, "log_with", ["wandb"])):
            # accelerate drops a tracker whose package it cannot find
            self.failed(ImportError("the wandb package is not installed"))
            return
        root = self.wandb_dir()
        problem = _unwritable(root)
        if problem:
            src = "WANDB_DIR" if os.environ.get("WANDB_DIR") else "train.output_dir"
            self.failed(OSError(f"{src} '{root}' is not a writable directory ({problem})"))
            return
        init = {
            "name": name,
            "group": cfg.tracking.group or cfg.experiment,
            "job_type": cfg.split_mode,
            "dir": str(root),
            "tags": [cfg.split_mode, _precision(run_config.get("mixed_precision"))],
        }
        if not os.environ.get("WANDB_MODE") and not has_wandb_credentials():
            init["mode"] = "offline"  # no account: files under the run dir, `wandb sync` later
        try:
            self.accelerator.init_trackers(cfg.tracking.project, config=run_config, init_kwargs={"wandb": init})
            self.on = any(t.name == "wandb" for t in self.accelerator.trackers)
        except Exception as exc:  # a tracker must never stop training
            self.failed(exc)

    def _wandb_run(self):
        for t in self.accelerator.trackers:
            if t.name == "wandb":
                return getattr(t, "run", None)
        return None

    def failed(self, exc: BaseException) -> None:
        """One warning line; the wandb tracker is dropped so nothing touches it again."""
        self.on = False
        if self.accelerator is not None:
            trackers = getattr(self.accelerator, "trackers", [])
            for t in [t for t in trackers if getattr(t, "name", None) == "wandb"]:
                run = getattr(t, "run", None)
                try:
                    if run is not None:
                        run.finish(exit_code=1)
                except Exception:
                    pass
                trackers.remove(t)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"warning: wandb tracker disabled ({type(exc).__name__}: {msg}); metrics still go to {self.metrics_path}",
            file=sys.stderr,
            flush=True,
        )

    def log(self, row: dict) -> None:
        if not self.on:
            return
        try:
            self.accelerator.log(wandb_figures(row), step=row["step"])
        except Exception as exc:
            self.failed(exc)

    def finish(self, summary: dict) -> None:
        if not self.on:
            return
        try:
            run = self._wandb_run()
            if run is not None:
                # Commit the last history row first: committed later (at
                # finish) it would overwrite summary keys it shares, e.g.
                # the last epoch's examples_per_sec over the run's.
                run.log({}, commit=True)
                run.summary.update(summary)
            # Not accelerator.end_training(): it also destroys the process
            # group, and only this (main) process gets here.
            for t in list(self.accelerator.trackers):
                t.finish()
            self.on = False
        except Exception as exc:
            self.failed(exc)


def row_kind(row: dict) -> str:
    """``epoch`` for an epoch's row (it carries the evaluation), ``step`` for a logged step's."""
    return "epoch" if "test_acc" in row else "step"


def wandb_figures(row: dict) -> dict:
    """A metrics.jsonl row as wandb history figures: every key but ``step`` (wandb's step) under
    its row's kind, ``step/loss`` or ``epoch/loss``.  At an epoch's last step both rows are
    logged at the same wandb step, and wandb merges what is logged at one step into one history
    row: under plain keys the epoch row's ``loss`` (and ``examples_per_sec``, ``mfu`` ...) would
    overwrite the step row's, so one of two figures that metrics.jsonl holds would never reach
    wandb.  Under distinct keys both do (docs/records.md)."""
    kind = row_kind(row)
    return {f"{kind}/{k}": v for k, v in row.items() if k != "step"}


def _is_wandb(t) -> bool:
    """A tracker instance (``.name``) or accelerate's LoggerType / a plain string (``.value``)."""
    return getattr(t, "name", None) == "wandb" or str(getattr(t, "value", t)).lower() == "wandb"


def _precision(mixed_precision) -> str:
    return "fp32" if mixed_precision in (None, "no") else str(mixed_precision)


def _unwritable(path: Path) -> str | None:
    """None if ``path`` is (or can be made) a writable directory, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if not path.is_dir():
        return "not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return "permission denied"
    return None
