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
        """On resume: drop rows logged after the checkpoint (they will be logged again) and a
        torn last line; put back ``carried``, the checkpoint's last evaluation row, if the
        file lost it (so the records end as the uninterrupted run's)."""
        if not self.is_main:
            return
        rows = []
        if self.metrics_path.exists():
            try:
                rows = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= step]
            except ValueError as exc:
                raise RunDirError(f"cannot resume the records: {exc}; repair or remove that line") from None
        if carried and carried.get("step", step + 1) <= step:
            row = _clean(carried)
            if row not in rows:
                at = sum(1 for r in rows if r.get("step", 0) <= row["step"])
                rows.insert(at, row)
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
        if self.plots and "test_acc" in row:
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
