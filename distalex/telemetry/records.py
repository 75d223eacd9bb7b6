"""Run records: metrics.jsonl, summary.json and curves.png, always; wandb beside them
(:mod:`distalex.telemetry.tracker`) when ``tracking.wandb`` is on.

Only the main process writes.  Everything that goes to wandb also goes to
metrics.jsonl, so a run is fully readable without any account or network.
A failing curves plot prints one warning line and training continues.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from distalex.errors import RunDirError
from distalex.runtime.io import append_jsonl, read_jsonl, write_json, write_jsonl
from distalex.telemetry.tracker import WandbTracker


def _clean(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


def is_evaluation_row(row: dict) -> bool:
    """An epoch's row (evaluated: it has ``test_acc``), as opposed to a step row."""
    return "test_acc" in row


class RunLog:
    """metrics.jsonl + summary.json + curves.png + wandb, on the main process only."""

    def __init__(self, output_dir: str, is_main: bool, accelerator=None, plots: bool = True):
        self.dir = Path(output_dir)
        self.is_main = is_main
        self.accelerator = accelerator
        self.plots = plots
        self.title: str | None = None
        self.metrics_path = self.dir / "metrics.jsonl"
        self.curves_path = self.dir / "curves.png"
        self._plot_warned = False
        self.tracker = WandbTracker(self.dir, accelerator, self.metrics_path)
        self._latest: dict = {}  # the newest value of every key logged (or found on resume)

    @property
    def wandb_on(self) -> bool:
        return self.tracker.on

    def start_wandb(self, cfg, run_config: dict, name: str) -> None:
        self.title = name
        if self.is_main:
            self.tracker.start(cfg, run_config, name)

    # -- local records ----------------------------------------------------------------
    def trim_after(self, step: int, carried: dict | None = None) -> None:
        """On resume: make the records what they were when the checkpoint of ``step`` was
        written, so the resumed run logs every later row exactly once.

        Dropped: rows logged after that step, a torn last line, and an evaluation row *of*
        that step that the checkpoint does not carry -- it was logged after the checkpoint
        (a step checkpoint at an epoch's last step, then the epoch row, then a kill before
        the epoch's own checkpoint), and the resumed run evaluates that step again.  Put
        back: ``carried``, the checkpoint's last evaluation row, if the file lost it."""
        if not self.is_main:
            return
        rows = []
        if self.metrics_path.exists():
            try:
                rows = read_jsonl(self.metrics_path)
            except ValueError as exc:
                raise RunDirError(f"cannot resume the records: {exc}; repair or remove that line") from None
        carried = _clean(carried) if carried else None
        kept, seen_carried = [], False
        for r in rows:
            at = r.get("step", 0)
            if at > step:
                continue
            if at == step and is_evaluation_row(r):
                # of this step: only the checkpoint's own evaluation row, once
                if r != carried or seen_carried:
                    continue
                seen_carried = True
            kept.append(r)
        if carried and carried.get("step", step + 1) <= step and carried not in kept:
            kept.insert(sum(1 for r in kept if r.get("step", 0) <= carried["step"]), carried)
        rows = kept
        if rows or self.metrics_path.exists():
            write_jsonl(self.metrics_path, rows)
        for r in rows:
            self._latest.update(r)

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        row = _clean(row)
        self._latest.update(row)
        self.dir.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.metrics_path, row)
        self.tracker.log(row)
        if self.plots and is_evaluation_row(row):
            self.write_curves()

    def latest(self, keys) -> dict:
        """The newest logged value of each of ``keys`` that was logged (main process only)."""
        return {k: self._latest[k] for k in keys if k in self._latest}

    def write_curves(self) -> None:
        """(Re)draw curves.png from the whole metrics.jsonl (so a resumed run's
        curves include the epochs before the interruption)."""
        try:
            from distalex.telemetry.plots import plot_curves

            plot_curves(read_jsonl(self.metrics_path), self.curves_path, title=self.title)
        except Exception as exc:  # a plot must never stop training
            if not self._plot_warned:
                self._plot_warned = True
                print(f"warning: curves not written ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)

    def finish(self, summary: dict) -> None:
        if not self.is_main:
            return
        summary = _clean(summary)
        write_json(self.dir / "summary.json", summary)
        self.tracker.finish(summary)
