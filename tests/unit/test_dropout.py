"""Placement-invariant dropout (distalex/model/dropout.py): the masks' statistics, and that
every slicing of one layer -- replicas' rows, towers' or fc shards' units -- applies exactly
the slice of the one global mask (the property that makes every placement train the same run)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distalex.model.alexnet import AlexNet, AlexNetSpec
from distalex.model.dropout import KeyedDropout, global_keep_mask, mask_seed

CPU = torch.device("cpu")
ROWS, UNITS = 128, 4096  # the d2l network's global batch and fc6/fc7 width


def mask(seed=0, step=0, layer=6, p=0.5, rows=ROWS, units=UNITS) -> torch.Tensor:
    return global_keep_mask(seed, step, layer, rows, units, p, CPU)


@pytest.mark.parametrize("p", [0.5, 0.2, 0.9])
def test_each_unit_is_kept_with_probability_one_minus_p(p):
    """Binomial bound: the kept count within 5 standard deviations of n(1-p), per mask and per
    row/column share (a row of a replica's slice, a unit of a tower's)."""
    m = mask(p=p, step=3)
    n = m.numel()
    assert abs(m.sum().item() - n * (1 - p)) <= 5 * math.sqrt(n * p * (1 - p))
    col = m[:, 0:64].float().mean(0)  # 64 units over 128 rows each
    assert (col - (1 - p)).abs().max() <= 5 * math.sqrt(p * (1 - p) / ROWS)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize(
    ("other", "what"),
    [
        (dict(step=1), "neighbouring steps"),
        (dict(layer=7), "the two dropout layers"),
        (dict(seed=1), "neighbouring seeds"),
    ],
)
def test_masks_of_different_keys_are_uncorrelated(other, what):
    """|correlation| of independent masks is ~N(0, 1/n): 5/sqrt(n) bounds it."""
    bound = 5 / math.sqrt(ROWS * UNITS)
    assert abs(corr(mask(), mask(**other))) <= bound, what


def test_rows_and_units_of_one_mask_are_uncorrelated():
    m = mask(step=11).float()
    bound = 5 / math.sqrt(UNITS)
    assert abs(corr(m[0], m[1])) <= bound  # neighbouring rows (neighbouring examples of a batch)
    assert abs(corr(m[:, 0], m[:, 1])) <= 5 / math.sqrt(ROWS)  # neighbouring units


def test_keys_are_distinct_for_nearby_inputs():
    keys = {mask_seed(s, t, layer) for s in range(3) for t in range(200) for layer in (6, 7)}
    assert len(keys) == 3 * 200 * 2 and all(0 <= k < 2**63 for k in keys)


def placed(rows_offset, global_rows, part, step=5, seed=9, p=0.5, units=64) -> KeyedDropout:
    d = KeyedDropout(p, layer=6, units=units).train()
    d.place(rows_offset, global_rows, part)
    d.at_step(seed, step)
    return d


@pytest.mark.parametrize(
    ("replicas", "parts"),
    [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4), (4, 2)],
    ids=lambda v: str(v),
)
def test_any_slicing_applies_the_slice_of_the_global_mask(replicas, parts):
    """Replicas take their rows, towers/fc shards their units: the pieces put together are the
    whole layer's output, bit for bit, as one unplaced module (the single-device case) computes it."""
    rows, units = 16, 64
    x = torch.randn(rows, units)
    whole = placed(0, None, (0, 1), units=units)(x)
    r, u = rows // replicas, units // parts
    pieces = [
        [
            placed(i * r, rows, (j, parts), units=units)(x[i * r : (i + 1) * r, j * u : (j + 1) * u])
            for j in range(parts)
        ]
        for i in range(replicas)
    ]
    assert torch.equal(torch.cat([torch.cat(row, dim=1) for row in pieces], dim=0), whole)
    # and it is dropout: zeros where dropped, x / (1 - p) where kept
    keep = mask(seed=9, step=5, rows=rows, units=units)
    assert torch.equal(whole, torch.where(keep, x * 2.0, torch.zeros_like(x)))


def test_the_mask_moves_with_the_step_and_not_with_anything_else():
    x = torch.ones(8, 64)
    a, b = placed(0, None, (0, 1), step=1)(x), placed(0, None, (0, 1), step=2)(x)
    assert not torch.equal(a, b)
    assert torch.equal(a, placed(0, None, (0, 1), step=1)(x))  # drawn again: the same


def test_eval_and_p_zero_are_the_identity():
    x = torch.randn(4, 64)
    assert torch.equal(placed(0, None, (0, 1)).eval()(x), x)
    assert torch.equal(placed(0, None, (0, 1), p=0.0)(x), x)


def test_a_slice_that_does_not_tile_the_layer_is_an_error():
    with pytest.raises(RuntimeError, match="units"):
        placed(0, None, (0, 2), units=64)(torch.ones(2, 64))


def test_the_network_uses_it_unless_asked_for_per_process_dropout():
    keyed = [m for m in AlexNet(AlexNetSpec(width=0.125, image_size=67)).modules() if isinstance(m, KeyedDropout)]
    assert [(d.layer, d.units) for d in keyed] == [(6, 512), (7, 512)]
    plain = AlexNet(AlexNetSpec(width=0.125, image_size=67, dropout_rng="process"))
    assert not any(isinstance(m, KeyedDropout) for m in plain.modules())
    assert sum(isinstance(m, nn.Dropout) for m in plain.modules()) == 2
