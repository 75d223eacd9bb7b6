"""Learning-rate schedules shared by the recipes; stepped once per epoch, resumable.

* ``constant``: d2l's train_ch6 (lr fixed for the whole run).
* ``plateau``: the paper's (§5): divide the rate by 10 when the validation
  error has not improved for more than ``patience`` epochs (the semantics of
  torch's ReduceLROnPlateau).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LRSchedule:
    lr: float
    kind: str = "constant"
    factor: float = 0.1
    patience: int = 1
    min_lr: float = 0.0
    best: float = float("inf")
    bad_epochs: int = 0
    reductions: int = 0

    @classmethod
    def from_config(cls, optim) -> LRSchedule:
        return cls(
            lr=optim.lr,
            kind=optim.schedule,
            factor=optim.plateau_factor,
            patience=optim.plateau_patience,
            min_lr=optim.min_lr,
        )

    def step_epoch(self, val_error: float) -> bool:
        """Record one epoch's validation error; True when the rate was reduced."""
        if self.kind == "constant":
            return False
        if val_error < self.best:
            self.best, self.bad_epochs = val_error, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs > self.patience and self.lr * self.factor >= self.min_lr:
            self.lr *= self.factor
            self.bad_epochs = 0
            self.reductions += 1
            return True
        return False

    def apply(self, optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr

    def state_dict(self) -> dict:
        return asdict(self)

    # Progress comes from the checkpoint; the settings (kind, factor, patience,
    # min_lr) stay those of the resumed run's config.
    PROGRESS = ("lr", "best", "bad_epochs", "reductions")

    def load_state_dict(self, state: dict) -> None:
        for key in self.PROGRESS:
            setattr(self, key, state[key])
