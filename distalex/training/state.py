"""What a run is at any instant: the thing a checkpoint saves and restores.

:class:`TrainingState` holds the raw model (reference-shaped parameter names,
never wrapped), the optimizer, the LR schedule, the mixed-precision scaler,
the training meter, where in the data the run is (:class:`Position`) and the
whole-run figures carried across resumes (:class:`Totals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from distalex.training.meters import TrainMeter
from distalex.training.schedule import LRSchedule


@dataclass
class Position:
    epoch: int = 0  # epoch being trained
    batch: int = 0  # next batch of that epoch
    step: int = 0  # optimizer steps done


@dataclass
class Totals:
    """Whole-run figures carried across resumes."""

    train_examples: float = 0.0  # of finished (or final partial) epochs
    train_time: float = 0.0
    wall_time: float = 0.0  # of earlier segments of the run (before a resume)


@dataclass
class TrainingState:
    model: nn.Module  # the raw module: this rank's tower or the whole reference model
    optimizer: Any  # torch.optim.SGD, wrapped by accelerate for the gradient scaler
    schedule: LRSchedule
    scaler: Any  # accelerate's GradScaler (fp16) or None
    meter: TrainMeter
    position: Position = field(default_factory=Position)
    totals: Totals = field(default_factory=Totals)
