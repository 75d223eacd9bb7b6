"""Run records: metrics.jsonl and summary.json (always), wandb through accelerate (optional).

Only the main process writes.  Everything that goes to wandb also goes to
metrics.jsonl, so a run is fully readable without any account or network.  A
tracker that fails prints one warning and training continues on the local logs.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "checkpoints")


def _clean(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


def read_jsonl(path) -> list:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def run_name(cfg, world_size: int, device_name: str) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    device = device_name.replace(" ", "-").lower()
    return f"{cfg.experiment}-{cfg.split_mode}-{world_size}x{device}-{cfg.train.mixed_precision.replace('no', 'fp32')}"


class RunLog:
    """metrics.jsonl + summary.json + wandb, on the main process only."""

    def __init__(self, output_dir: str, is_main: bool, accelerator=None):
        self.dir = Path(output_dir)
        self.is_main = is_main
        self.accelerator = accelerator
        self.wandb_on = False
        self.metrics_path = self.dir / "metrics.jsonl"

    def start_wandb(self, cfg, run_config: dict, name: str) -> None:
        if not (self.is_main and cfg.tracking.wandb and self.accelerator is not None):
            return
        init = {"name": name, "group": cfg.tracking.group or cfg.experiment, "job_type": cfg.split_mode,
                "dir": os.environ.get("WANDB_DIR", str(self.dir))}
        if not os.environ.get("WANDB_MODE") and not has_wandb_credentials():
            init["mode"] = "offline"   # no account: files under the run dir, `wandb sync` later
        try:
            self.accelerator.init_trackers(cfg.tracking.project, config=run_config, init_kwargs={"wandb": init})
            self.wandb_on = any(t.name == "wandb" for t in self.accelerator.trackers)
        except Exception as exc:  # a tracker must never stop training
            self._tracker_failed(exc)

    def _tracker_failed(self, exc: Exception) -> None:
        self.wandb_on = False
        print(f"warning: wandb tracker disabled ({type(exc).__name__}: {exc}); "
              f"metrics still go to {self.metrics_path}", file=sys.stderr)

    def trim_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint (they will be logged again)."""
        if not (self.is_main and self.metrics_path.exists()):
            return
        rows = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= step]
        tmp = self.metrics_path.with_name("metrics.jsonl.tmp")
        with open(tmp, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        os.replace(tmp, self.metrics_path)

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        row = _clean(row)
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.wandb_on:
            try:
                self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
            except Exception as exc:
                self._tracker_failed(exc)

    def finish(self, summary: dict) -> None:
        if not self.is_main:
            return
        summary = _clean(summary)
        write_json_atomic(self.dir / "summary.json", summary)
        if self.wandb_on:
            try:
                import wandb
                if wandb.run is not None:
                    for k, v in summary.items():
                        wandb.run.summary[k] = v
                self.accelerator.end_training()
            except Exception as exc:
                self._tracker_failed(exc)
