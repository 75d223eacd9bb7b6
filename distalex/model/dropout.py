"""Dropout whose mask depends only on (seed, step, layer, global row, unit).

With ``nn.Dropout`` every process draws its masks from its own RNG, so the same
network trained on the same global batches follows a different trajectory in
every placement (and with every number of processes).  :class:`KeyedDropout`
instead computes the mask of the *whole* layer -- every row of the global batch,
every unit -- from a generator seeded by (seed, step, layer), and keeps the
slice this module computes: the rows a replica holds, the units a tower or an fc
shard holds.  Every placement then multiplies each activation by the same mask
entry, and the single-device equivalence holds with dropout on (docs/design.md,
"Dropout").

Cost: one uniform draw per element of the layer's global activation (global
batch x units) per step, on the activation's device, redundant on each process
that holds part of the layer -- 2 x 128 x 4096 numbers per step for the d2l
network, about a millisecond on a CPU core.

The module knows nothing of processes: the placement tells it where its slice
lies (:meth:`KeyedDropout.place`) and which step runs (:meth:`KeyedDropout.at_step`).
"""

from __future__ import annotations

import torch
from torch import nn

_MASK64 = (1 << 64) - 1


def mask_seed(seed: int, step: int, layer: int) -> int:
    """A 63-bit generator seed from (seed, step, layer): splitmix64 over the three, so that
    neighbouring steps and layers get unrelated streams."""
    x = 0
    for part in (seed, step, layer):
        x = (x + (part & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def global_keep_mask(
    seed: int, step: int, layer: int, rows: int, units: int, p: float, device: torch.device
) -> torch.Tensor:
    """The keep mask (True = kept) of one layer for the whole global batch: [rows, units]."""
    generator = torch.Generator(device=device)
    generator.manual_seed(mask_seed(seed, step, layer))
    return torch.rand((rows, units), generator=generator, device=device) >= p


class KeyedDropout(nn.Module):
    """Dropout of layer ``layer`` (``units`` wide in the whole network) with placement-invariant masks.

    Input: [rows here, units here].  Unplaced, the module takes its input as the whole
    batch and the whole layer (the single-device case)."""

    def __init__(self, p: float, layer: int, units: int):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.layer, self.units = p, layer, units
        self.seed, self.step = 0, 0
        self.row_offset: int = 0  # where this module's rows start in the global batch
        self.global_rows: int | None = None  # rows of the global batch (None: the input's)
        self.unit_part: tuple[int, int] = (0, 1)  # (index, parts): this module holds part `index` of `parts`

    def place(self, row_offset: int, global_rows: int | None, unit_part: tuple[int, int]) -> None:
        self.row_offset, self.global_rows, self.unit_part = row_offset, global_rows, unit_part

    def at_step(self, seed: int, step: int) -> None:
        self.seed, self.step = seed, step

    @torch.compiler.disable  # a Python-side key per step: keep it out of compiled graphs
    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        rows, units = x.shape
        index, parts = self.unit_part
        if units * parts != self.units:
            raise RuntimeError(f"{units} units x {parts} parts != the layer's {self.units} units")
        total = rows if self.global_rows is None else self.global_rows
        mask = global_keep_mask(self.seed, self.step, self.layer, total, self.units, self.p, x.device)
        return mask[self.row_offset : self.row_offset + rows, index * units : (index + 1) * units]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # The same arithmetic as nn.Dropout: kept activations scaled by 1 / (1 - p).
        return x * self._keep(x).to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}, units={self.units}"
