"""Tower-parallel AlexNet: one tower of the paper's layout per process.

Each rank of a tower group holds 1/T of conv1..conv5's kernels, 1/T of fc6/fc7's
units and fc8's weight columns for its own fc7 units (Krizhevsky et al. 2012,
§3.2, Fig. 2).  Towers exchange activations at exactly four points, the
inputs of conv3, fc6, fc7 and fc8; nowhere else:

* conv3, fc6, fc7: every tower's maps are *gathered* along the channel
  dimension; backward sums the gathered gradient over the towers that used it
  and keeps this tower's slice.
* fc8 is row-parallel: each tower multiplies its own fc7 units by its columns
  of fc8 and the partial logits are *summed* over towers (that sum is fc8
  reading all fc7 units).  fc8's bias is kept whole on every tower and added
  after the sum; its gradient is the same on every tower, so it stays equal
  without any averaging between towers.  Every tower then holds the same
  logits and computes the same loss, so the sum's backward is the identity:
  the loss is counted once, not T times.

The layers are built by :func:`distalex.model.alexnet.build_layers`, so a tower's
parameters map one to one onto slices of the reference model's
(:func:`shard_state_dict` / :func:`unshard_state_dict`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.profiler import record_function

from distalex.model.alexnet import AlexNetSpec, build_layers, run_layers
from distalex.parallel.comm import CommStats, all_gather_bytes, all_reduce_bytes

# The profiler files the time spent inside this label as tower communication (distalex/telemetry/profiling.py).
PROFILE_LABEL = "comm:tower"


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _channels_to_end(x: torch.Tensor) -> torch.Tensor:
    """NCHW tensor (any strides) -> a contiguous NHWC tensor: free when ``x`` is channels_last."""
    return x.permute(0, 2, 3, 1).contiguous()


class _GatherChannels(torch.autograd.Function):
    """Forward: concatenate every tower's tensor along dim 1 (tower order).
    Backward: sum the gradient over towers, return this tower's slice.

    Maps arriving in channels_last stay channels_last: they are exchanged as NHWC
    buffers and concatenated along C (the last dimension there), so conv3 gets
    channels_last input without a layout conversion on either side of the
    exchange, and the gradient goes back in the same layout."""

    @staticmethod
    def forward(ctx, x, group, towers, tower, stats):
        with record_function(PROFILE_LABEL):
            ctx.nhwc = _channels_last(x)
            x = _channels_to_end(x) if ctx.nhwc else x.contiguous()
            parts = [torch.empty_like(x) for _ in range(towers)]
            dist.all_gather(parts, x, group=group)
            ctx.group, ctx.towers, ctx.tower, ctx.stats = group, towers, tower, stats
            stats.count(all_gather_bytes(x.numel(), towers, x.element_size()))
            if ctx.nhwc:
                return torch.cat(parts, dim=3).permute(0, 3, 1, 2)  # NCHW shape, channels_last strides
            return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        with record_function(PROFILE_LABEL):
            grad = _channels_to_end(grad) if ctx.nhwc else grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
            ctx.stats.count(all_reduce_bytes(grad.numel(), ctx.towers, grad.element_size()))
            if ctx.nhwc:
                return grad.chunk(ctx.towers, dim=3)[ctx.tower].contiguous().permute(0, 3, 1, 2), None, None, None, None
            return grad.chunk(ctx.towers, dim=1)[ctx.tower].contiguous(), None, None, None, None


class _SumOverTowers(torch.autograd.Function):
    """Forward: all-reduce sum of partial logits.  Backward: identity (the loss that
    follows is computed identically on every tower and must count once)."""

    @staticmethod
    def forward(ctx, x, group, towers, stats):
        with record_function(PROFILE_LABEL):
            x = x.contiguous().clone()
            dist.all_reduce(x, group=group)
            stats.count(all_reduce_bytes(x.numel(), towers, x.element_size()))
            return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def shard_dim(name: str) -> int | None:
    """Dimension along which the reference parameter ``name`` is cut into towers
    (None: kept whole on every tower)."""
    if name == "fc8.weight":
        return 1  # fc8 is row-parallel: columns follow fc7's units
    if name == "fc8.bias":
        return None
    return 0  # conv kernels and fc6/fc7 units: output dimension


class TowerAlexNet(nn.Module):
    """Tower ``tower`` of ``spec.towers``; parameter names equal the reference's."""

    def __init__(self, spec: AlexNetSpec, tower: int, group: dist.ProcessGroup | None, stats: CommStats | None = None):
        super().__init__()
        self.spec, self.tower, self.towers, self.group = spec, tower, spec.towers, group
        self.stats = stats if stats is not None else CommStats()
        for name, module in build_layers(spec, towers_in_module=spec.towers, groups=1).items():
            self.add_module(name, module)
        self.fc8 = nn.Linear(spec.fc_units // spec.towers, spec.num_classes)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherChannels.apply(x, self.group, self.towers, self.tower, self.stats)

    def _run(self, x: torch.Tensor, first: str, last: str) -> torch.Tensor:
        return run_layers(self, x, first, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run(x, "conv1", "pool2")  # own tower's maps only
        x = self._run(self._gather(x), "conv3", "flatten")  # exchange 1: conv3 input
        x = self._run(self._gather(x), "fc6", "drop6")  # exchange 2: fc6 input
        x = self._run(self._gather(x), "fc7", "drop7")  # exchange 3: fc7 input
        with record_function("compute:fc8"):  # called as a function, not a module: label it here
            partial = torch.nn.functional.linear(x, self.fc8.weight)
        logits = _SumOverTowers.apply(partial, self.group, self.towers, self.stats)  # exchange 4
        with record_function("compute:fc8"):
            return logits + self.fc8.bias


def shard_state_dict(
    reference: dict[str, torch.Tensor], tower: int, towers: int, dim_of=shard_dim
) -> dict[str, torch.Tensor]:
    """This tower's slice of a reference-model state dict (or of any per-parameter
    tensors shaped like the parameters, e.g. momentum buffers).  ``dim_of(name)``:
    the dimension a parameter is cut along, None when every part holds all of it
    (the towers' layout by default; :mod:`distalex.parallel.hybrid` passes its own)."""
    out = {}
    for name, tensor in reference.items():
        dim = dim_of(name)
        out[name] = tensor if dim is None else tensor.chunk(towers, dim=dim)[tower]
        out[name] = out[name].clone()
    return out


def unshard_state_dict(shards: list[dict[str, torch.Tensor]], dim_of=shard_dim) -> dict[str, torch.Tensor]:
    """Concatenate the towers' slices (in tower order) back into reference tensors."""
    out = {}
    for name in shards[0]:
        dim = dim_of(name)
        out[name] = shards[0][name].clone() if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out


def gather_tensors(tensors: dict[str, torch.Tensor], group, towers: int, dim_of=shard_dim) -> dict[str, torch.Tensor]:
    """Collective over the tower group: every tower gets the reference-shaped tensors.
    Tensors every part holds whole (``dim_of`` None) are not sent: this part's copy is kept."""
    out = {}
    for name, t in tensors.items():
        dim = dim_of(name)
        if dim is None:
            out[name] = t.detach().clone()
            continue
        t = t.detach().contiguous()
        gathered = [torch.empty_like(t) for _ in range(towers)]
        dist.all_gather(gathered, t, group=group)
        out[name] = torch.cat(gathered, dim=dim)
    return out
