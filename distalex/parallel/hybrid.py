"""Hybrid AlexNet: data-parallel convolutions, model-parallel fully-connected layers.

Krizhevsky's "one weird trick" (arXiv:1404.5997, 2014): the convolutional
layers hold few of the parameters but do most of the arithmetic, the
fully-connected layers the opposite, so the convolutions are replicated (data
parallelism: cheap to synchronise, a small gradient) and the fully-connected
layers are split by units (model parallelism: no weight gradient crosses a link,
only activations).  In the d2l network conv1-conv5 are ~8% of the parameters and
~95% of the training FLOPs.

With W processes, each process (rank r):

* runs conv1..conv5 on its own B/W rows of the global batch with a full copy of
  the convolutional weights (grouped convolutions when ``towers > 1``);
* all-gathers the flattened conv5 features over the ranks, so that the
  fully-connected layers see the **whole global batch** (exchange 1);
* holds 1/W of fc6's units and computes them for all B rows (column-parallel);
* all-gathers the fc6 units along the feature dimension (exchange 2) and holds
  1/W of fc7's units (column-parallel);
* holds fc8's weight columns for its own fc7 units: its partial logits for all
  B rows are summed over the ranks and each rank keeps only its own B/W rows
  (row-parallel, a reduce-scatter: exchange 3); fc8's bias is added to those
  rows afterwards.

The forward therefore takes this rank's B/W rows and returns their logits, so
the loss, meters and evaluation downstream are those of data parallelism.

Gradient scales.  Each rank's loss is a mean over its own B/W rows; the
objective is the global mean, i.e. the average of the ranks' losses.
Everything between exchange 1 and exchange 3 (the fc shards) is computed on the
whole batch, so exchange 3's backward gathers every rank's logit gradient and
divides it by W: the fc shards receive the exact gradient of the global mean
and are **never averaged** with one another.  Everything outside that span
(conv1..conv5 before exchange 1, fc8's bias after exchange 3) works on the
rank's own rows, like a DDP replica: exchange 1's backward hands the features
their gradient at the scale of the rank's own loss (W times their share of the
global mean's gradient), and DDP - restricted to those replicated parameters -
averages them over the ranks.  Exact, and any of DDP's communication hooks that
average (the default, bf16/fp16 compression) applies to them unchanged.

Each exchange is a small autograd Function over ``all_gather_single`` /
``reduce_scatter_single`` (they run on gloo and NCCL alike) and counts the bytes
it sends, with ring accounting, in a :class:`~distalex.parallel.comm.CommStats`;
:func:`distalex.parallel.comm.hybrid_bytes_per_step` computes the same figures from the shapes.

Parameter names equal the reference model's, so a checkpoint maps one to one
(:func:`shard_dim`, :func:`distalex.parallel.towers.shard_state_dict` with ``dim_of``).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.profiler import record_function

from distalex.errors import ConfigError
from distalex.model.alexnet import AlexNet, AlexNetSpec, build_layers, run_layers
from distalex.parallel.comm import CommStats, all_gather_bytes, reduce_scatter_bytes
from distalex.parallel.towers import gather_tensors

# The profiler files the time spent inside this label as the hybrid exchanges (distalex/telemetry/profiling.py).
PROFILE_LABEL = "comm:hybrid"
FC_SHARDED = ("fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias", "fc8.weight")


def shard_dim(name: str) -> int | None:
    """Dimension along which reference parameter ``name`` is cut into the W ranks'
    shards; None for the replicated parameters (conv1..conv5, fc8's bias)."""
    if name == "fc8.weight":
        return 1  # row-parallel: its columns follow fc7's units
    if name in FC_SHARDED:
        return 0  # column-parallel: fc6/fc7 units
    return None


def is_replicated(name: str) -> bool:
    """Whether DDP synchronises parameter ``name`` (every rank holds all of it)."""
    return shard_dim(name) is None


def _profiled(exchange):
    """Run ``exchange`` under the profiler label of the hybrid exchanges (distalex/telemetry/profiling.py)."""

    @functools.wraps(exchange)
    def labelled(*args):
        with record_function(PROFILE_LABEL):
            return exchange(*args)

    return labelled


class _GatherRows(torch.autograd.Function):
    """Forward: concatenate every rank's rows (rank order = the global batch's order).
    Backward: sum the whole-batch gradient over the ranks (reduce-scatter), keep this
    rank's rows, and scale it by ``grad_scale`` (W: the scale of the rank's own loss,
    which DDP's averaging of the conv gradients expects)."""

    @staticmethod
    @_profiled
    def forward(ctx, x, group, world, stats, grad_scale):
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x, group=group)
        stats.count(all_gather_bytes(x.numel(), world, x.element_size()))
        ctx.group, ctx.world, ctx.stats, ctx.grad_scale = group, world, stats, grad_scale
        return out

    @staticmethod
    @_profiled
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))
        dist.reduce_scatter_single(out, grad, group=ctx.group)
        ctx.stats.count(reduce_scatter_bytes(out.numel(), ctx.world, out.element_size()))
        if ctx.grad_scale != 1:
            out = out * ctx.grad_scale
        return out, None, None, None, None


class _GatherColumns(torch.autograd.Function):
    """Forward: [B, u] on every rank -> [B, W*u], ranks' units side by side.
    Backward: sum the [B, W*u] gradient over the ranks (every rank's fc7 shard read
    all units) and keep this rank's u columns (reduce-scatter)."""

    @staticmethod
    @_profiled
    def forward(ctx, x, group, world, stats):
        x = x.contiguous()
        rows, units = x.shape
        stacked = x.new_empty((world * rows, units))
        dist.all_gather_single(stacked, x, group=group)
        stats.count(all_gather_bytes(x.numel(), world, x.element_size()))
        ctx.group, ctx.world, ctx.stats = group, world, stats
        return stacked.view(world, rows, units).transpose(0, 1).reshape(rows, world * units)

    @staticmethod
    @_profiled
    def backward(ctx, grad):
        rows, total = grad.shape
        units = total // ctx.world
        stacked = grad.reshape(rows, ctx.world, units).transpose(0, 1).contiguous()
        out = grad.new_empty((rows, units))
        dist.reduce_scatter_single(out, stacked.view(ctx.world * rows, units), group=ctx.group)
        ctx.stats.count(reduce_scatter_bytes(out.numel(), ctx.world, out.element_size()))
        return out, None, None, None


class _SumScatterRows(torch.autograd.Function):
    """Forward: sum the ranks' partial [B, C] logits and keep this rank's B/W rows
    (reduce-scatter).  Backward: gather every rank's row gradient into [B, C]
    and divide by W - each rank's loss is a mean over B/W rows, the objective the
    mean over all B - so every fc shard gets the gradient of the global mean."""

    @staticmethod
    @_profiled
    def forward(ctx, partial, group, world, stats):
        partial = partial.contiguous()
        out = partial.new_empty((partial.shape[0] // world, *partial.shape[1:]))
        dist.reduce_scatter_single(out, partial, group=group)
        stats.count(reduce_scatter_bytes(out.numel(), world, out.element_size()))
        ctx.group, ctx.world, ctx.stats = group, world, stats
        return out

    @staticmethod
    @_profiled
    def backward(ctx, grad):
        grad = grad.contiguous()
        full = grad.new_empty((ctx.world * grad.shape[0], *grad.shape[1:]))
        dist.all_gather_single(full, grad, group=ctx.group)
        ctx.stats.count(all_gather_bytes(grad.numel(), ctx.world, grad.element_size()))
        return full / ctx.world, None, None, None


class HybridAlexNet(nn.Module):
    """Rank ``shard`` of ``shards``: every conv layer whole, 1/W of fc6/fc7's units,
    fc8's columns for its own fc7 units and fc8's whole bias.  Parameter names
    equal the reference's.

    ``forward`` takes this rank's rows of the global batch and returns their
    logits.  Training batches must have the same number of rows on every rank
    (the data plan guarantees it); evaluation uses :func:`reference_view`.
    """

    def __init__(
        self, spec: AlexNetSpec, shard: int, shards: int, group: dist.ProcessGroup | None, stats: CommStats | None
    ):
        super().__init__()
        check_divisible(spec, shards)
        self.spec, self.shard, self.shards, self.group = spec, shard, shards, group
        self.stats = stats if stats is not None else CommStats()
        units = spec.fc_units // shards
        for name, module in build_layers(spec, towers_in_module=1, groups=spec.towers).items():
            self.add_module(name, module)
        self.fc6 = nn.Linear(spec.flat_features, units)  # reassigning keeps the layer order
        self.fc7 = nn.Linear(spec.fc_units, units)
        self.fc8 = nn.Linear(units, spec.num_classes)

    def _run(self, x: torch.Tensor, first: str, last: str) -> torch.Tensor:
        return run_layers(self, x, first, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.shards
        x = self._run(x, "conv1", "flatten")  # this rank's rows, every kernel
        x = _GatherRows.apply(x, self.group, w, self.stats, w)  # exchange 1: the global batch
        x = self._run(x, "fc6", "drop6")  # this rank's fc6 units, all rows
        x = _GatherColumns.apply(x, self.group, w, self.stats)  # exchange 2: all fc6 units
        x = self._run(x, "fc7", "drop7")  # this rank's fc7 units, all rows
        partial = nn.functional.linear(x, self.fc8.weight)
        logits = _SumScatterRows.apply(partial, self.group, w, self.stats)  # exchange 3: own rows
        return logits + self.fc8.bias


def check_divisible(spec: AlexNetSpec, shards: int) -> None:
    if spec.fc_units % shards:
        raise ConfigError(
            f"hybrid splits fc6/fc7's units over the processes: {spec.fc_units} units "
            f"(model.width={spec.width}) are not divisible by W={shards} processes "
            f"({spec.fc_units} % {shards} = {spec.fc_units % shards})"
        )


def reference_view(model: HybridAlexNet) -> AlexNet:
    """A collective over the ranks: the plain reference model holding the same
    weights (fc shards gathered; the replicated tensors shared with ``model``, not copied).
    For evaluation, which then runs data-parallel: each rank any number of rows."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    sharded = {n: t for n, t in params.items() if not is_replicated(n)}
    tensors = {n: t for n, t in params.items() if is_replicated(n)}
    tensors.update(gather_tensors(sharded, model.group, model.shards, dim_of=shard_dim))
    with torch.device("meta"):
        reference = AlexNet(model.spec)
    reference.load_state_dict(tensors, assign=True)
    return reference.train(model.training)


def replicated_parameters(spec: AlexNetSpec) -> int:
    """Parameters DDP all-reduces in hybrid mode: conv1..conv5 and fc8's bias."""
    with torch.device("meta"):
        reference = AlexNet(spec)
    return sum(p.numel() for n, p in reference.named_parameters() if is_replicated(n))
