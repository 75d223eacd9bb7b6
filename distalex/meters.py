"""Training figures kept on the device and read only when needed.

Reading a loss each step would stall the device every step (a host sync); the
meter adds into device tensors instead and the loop reads them at log
intervals, epoch ends and checkpoints.  It also remembers the first step whose
loss was not finite, so the NaN guard can name it without per-step syncs.
"""
from __future__ import annotations

import time

import torch

from distalex.parallel import Placement


class TrainMeter:
    def __init__(self, placement: Placement, loss_sum=0.0, correct=0.0, seen=0.0, train_time=0.0):
        self.placement = placement
        dev = placement.device
        self.epoch = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=dev)
        self.interval = torch.zeros(2, dtype=torch.float64, device=dev)       # loss sum, steps
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=dev)
        self.train_time = train_time           # seconds of training steps in this epoch
        self._t0 = None

    # -- per step, no host sync ---------------------------------------------------
    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        loss = loss.detach().double()
        n = torch.full((), labels.numel(), dtype=torch.float64, device=loss.device)
        correct = (logits.detach().argmax(1) == labels).sum().double()
        self.epoch += torch.stack([loss * n, correct, n])
        self.interval += torch.stack([loss, torch.ones_like(loss)])
        bad = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(bad, torch.full_like(self.bad_step, step), self.bad_step)

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
        """Step of the first non-finite loss on any rank, or -1."""
        bad = int(self.bad_step.item())
        return bad if self.placement.any_rank(bad >= 0) else -1

    def interval_loss(self) -> float:
        loss_sum, steps = self.placement.sum_over_replicas(self.interval.clone()).tolist()
        self.interval.zero_()
        return loss_sum / max(steps, 1)

    def epoch_figures(self) -> dict:
        loss_sum, correct, seen = self.placement.sum_over_replicas(self.epoch.clone()).tolist()
        return {"loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), "seen": seen,
                "examples_per_sec": self.examples_per_sec()}

    def examples_per_sec(self) -> float:
        """Global training examples per second of this epoch so far."""
        return float(self.epoch[2].item()) * self.placement.mesh.replicas / max(self.train_time, 1e-9)

    def new_epoch(self) -> None:
        self.epoch.zero_()
        self.train_time = 0.0

    def state(self) -> dict:
        loss_sum, correct, seen = self.epoch.tolist()
        return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "train_time": self.train_time}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
