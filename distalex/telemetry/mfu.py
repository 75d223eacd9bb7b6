"""Model FLOPs utilisation (MFU): the model's training FLOPs per second over the peak.

    tflops_per_sec = examples/sec x training FLOPs per example / 1e12
    mfu            = tflops_per_sec / (processes x peak TFLOP/s per process)

Training FLOPs per example come from the layer shapes (:mod:`distalex.model.flops`:
3 x the forward's 2 x MACs); the peak from :mod:`distalex.telemetry.peak`.  Only the
model's arithmetic counts, not what an implementation adds or repeats, so MFU
compares placements and machines on the same work.
"""

from __future__ import annotations

from dataclasses import dataclass

from distalex.config import TrainConfig
from distalex.model.flops import training_flops
from distalex.telemetry.peak import device_peak


@dataclass(frozen=True)
class Utilization:
    flops_per_example: int  # training FLOPs of one example (forward + backward)
    processes: int  # the world size: every process adds one device's peak
    peak_tflops: float | None = None  # per process; None: MFU unknown
    peak_source: str | None = None
    peak_precision: str | None = None  # the arithmetic the peak is of (None: train.peak_tflops)

    def figures(self, examples_per_sec: float) -> dict:
        """``tflops_per_sec`` and (with a peak) ``mfu`` at ``examples_per_sec`` (global)."""
        tflops = examples_per_sec * self.flops_per_example / 1e12
        out = {"tflops_per_sec": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / (self.processes * self.peak_tflops)
        return out

    def run_info(self) -> dict:
        info = {"flops_per_example": self.flops_per_example}
        if self.peak_tflops:
            info.update({"peak_tflops_per_process": self.peak_tflops, "peak_source": self.peak_source})
            if self.peak_precision is not None:  # None: train.peak_tflops, the user's figure
                info["peak_precision"] = self.peak_precision
        return info


def for_run(train: TrainConfig, placement, precision: str) -> tuple[Utilization, str]:
    """This run's utilisation figures and the line that tells where its peak comes from.

    ``precision``: what this process trains in, resolved on its own device (the
    accelerator's ``mixed_precision``), not the config's ``auto``."""
    peak, line = device_peak(placement.device, precision, train.peak_tflops)
    util = Utilization(
        flops_per_example=training_flops(placement.spec),
        processes=placement.mesh.world_size,
        peak_tflops=None if peak is None else peak.tflops,
        peak_source=None if peak is None else peak.source,
        peak_precision=None if peak is None else peak.precision,
    )
    return util, line
