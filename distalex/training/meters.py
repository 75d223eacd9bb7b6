"""Training figures kept on the device and read only when needed.

Reading a loss each step would stall the device every step (a host sync); the
meter adds into device tensors instead and the loop reads them at log
intervals, epoch ends and checkpoints.  It also remembers the first step whose
loss was not finite, so the NaN guard can name it without per-step syncs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

_NO_STEP = 2**62  # larger than any step: "no non-finite loss on this rank"


@dataclass(frozen=True)
class IntervalFigures:
    """Mean training loss over the steps since the last log row, summed over replicas, and the
    epoch's examples so far over all replicas."""

    loss: float
    steps: int
    seen: float


@dataclass(frozen=True)
class EpochFigures:
    """The epoch so far, over all replicas: mean loss and accuracy per example, examples seen."""

    loss: float
    train_acc: float
    seen: float
    examples_per_sec: float


class TrainMeter:
    def __init__(self, placement):
        self.placement = placement
        dev = placement.device
        # Per epoch, this replica: loss * examples, correct predictions, examples.
        self._epoch = torch.zeros(3, dtype=torch.float64, device=dev)
        # Since the last log row, this replica: sum of step losses, steps.
        self._interval = torch.zeros(2, dtype=torch.float64, device=dev)
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=dev)
        self.train_time = 0.0  # seconds of training steps in this epoch
        self._t0 = None

    # -- per step, no host sync ---------------------------------------------------
    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        loss = loss.detach().double()
        n = torch.full((), labels.numel(), dtype=torch.float64, device=loss.device)
        correct = (logits.detach().argmax(1) == labels).sum().double()
        self._epoch += torch.stack([loss * n, correct, n])
        self._interval += torch.stack([loss, torch.ones_like(loss)])
        bad = (self._bad_step < 0) & ~torch.isfinite(loss)
        self._bad_step = torch.where(bad, torch.full_like(self._bad_step, step), self._bad_step)

    # -- timing of training steps only (as d2l's examples/sec) -----------------------
    def start_clock(self) -> None:
        _sync(self.placement.device)
        self._t0 = time.perf_counter()

    def stop_clock(self) -> None:
        if self._t0 is not None:
            _sync(self.placement.device)
            self.train_time += time.perf_counter() - self._t0
            self._t0 = None

    # -- reads (host syncs; collectives over replicas) ------------------------------
    def first_bad_step(self) -> int:
        """Step of the first non-finite loss on any rank, or -1; the same on every rank (each
        replica has losses of its own, so one replica's NaN must stop them all)."""
        bad = int(self._bad_step.item())
        earliest = self.placement.min_over_ranks(bad if bad >= 0 else _NO_STEP)
        return -1 if earliest == _NO_STEP else earliest

    def read_interval(self) -> IntervalFigures:
        """The figures since the last call (a collective over replicas); starts a new interval."""
        # One all-reduce; each element is summed on its own, so the epoch's examples ride along
        # without changing the loss's rounding.
        figures = torch.cat([self._interval, self._epoch[2:]])
        loss_sum, steps, seen = self.placement.sum_over_replicas(figures).tolist()
        self._interval.zero_()
        return IntervalFigures(
            loss=loss_sum / max(steps, 1), steps=int(steps) // self.placement.mesh.replicas, seen=seen
        )

    def read_epoch(self) -> EpochFigures:
        """The epoch so far (a collective over replicas)."""
        loss_sum, correct, seen = self.placement.sum_over_replicas(self._epoch.clone()).tolist()
        return EpochFigures(
            loss=loss_sum / max(seen, 1),
            train_acc=correct / max(seen, 1),
            seen=seen,
            examples_per_sec=self.examples_per_sec(seen),
        )

    def examples_per_sec(self, seen: float) -> float:
        """Global training examples per second of this epoch so far, from the examples ``seen``
        over all replicas (summed, not this replica's times the replicas: after a resume in
        another placement the replicas need not have seen the same number)."""
        return seen / max(self.train_time, 1e-9)

    def new_epoch(self) -> None:
        self._epoch.zero_()
        self.train_time = 0.0

    # -- checkpoint ----------------------------------------------------------------------
    # This rank's running sums, unreduced: each rank saves and restores its own (reduced
    # sums would be added in another order on resume and round differently).  A checkpoint
    # holds every rank's (distalex/training/checkpoint.py, ``stats.meters``).
    def state_dict(self) -> dict:
        loss_sum, correct, seen = self._epoch.tolist()
        interval_loss, interval_steps = self._interval.tolist()
        return {
            "loss_sum": loss_sum,
            "correct": correct,
            "seen": seen,
            "train_time": self.train_time,
            "interval_loss": interval_loss,
            "interval_steps": interval_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """``state`` as :meth:`state_dict` gives it; without the interval (a checkpoint written
        before it was saved) the interval starts empty."""
        dev = self.placement.device
        self._epoch = torch.tensor(
            [state["loss_sum"], state["correct"], state["seen"]], dtype=torch.float64, device=dev
        )
        self._interval = torch.tensor(
            [state.get("interval_loss", 0.0), state.get("interval_steps", 0.0)], dtype=torch.float64, device=dev
        )
        self.train_time = float(state["train_time"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
