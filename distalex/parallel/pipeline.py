"""Pipeline parallelism: the network cut into S stages by layers, micro-batches in flight.

Stage k of a replica holds the layers from its first weight layer ``cuts[k]`` up to the next
stage's first (the ReLUs, pools, LRN, flatten and dropout that follow a weight layer stay with
it); the last stage holds fc8 and computes the loss.  A replica's batch of B/R rows is cut into
M micro-batches; each stage sends its output activations forward to the next stage and the
gradient of its input back to the previous one, point to point, once per micro-batch
(docs/pipeline.md).

The schedules are PyTorch's own (``torch.distributed.pipelining``: ``ScheduleGPipe``,
``Schedule1F1B``) driving :class:`InstrumentedStage`, a ``PipelineStage`` that also

* tells the placement which micro-batch is about to run forward (the dropout masks are keyed
  by global rows: :meth:`distalex.parallel.placement.PipelinePlacement.forward_backward`),
* records every action of the schedule (forward / backward of micro-batch i, start and end):
  the measured bubble and the micro-batches in flight come from these (:class:`StepTrace`),
* counts the bytes it sends at the stage boundaries (:class:`~distalex.parallel.comm.CommStats`).

Where to cut: ``pipeline.boundaries`` (the first layer of every stage but the first), or
balanced by the layers' forward MACs (:func:`distalex.model.flops.layer_counts`): the cut that
minimises the largest stage's arithmetic, which bounds the step time of a full pipeline.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from distalex.errors import ConfigError
from distalex.model.alexnet import AlexNet, AlexNetSpec
from distalex.parallel.comm import CommStats

# The profiler files the stage boundaries' sends and receives under this label (distalex/telemetry/profiling.py).
PROFILE_LABEL = "comm:pipeline"
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


# -- where to cut -------------------------------------------------------------------------
def cut_stages(layers: list[tuple[str, int]], stages: int, boundaries: list[str] | None) -> tuple[str, ...]:
    """The first weight layer of each of ``stages`` stages.  ``layers``: (name, forward MACs) of
    the weight layers in order (conv1..fc8).  ``boundaries``: the first layer of stages 1..S-1,
    or None to balance the MACs.  ConfigError with the numbers when the cut is impossible."""
    names = [name for name, _ in layers]
    if not 1 <= stages <= len(names):
        raise ConfigError(
            f"config key 'pipeline.stages': AlexNet has {len(names)} weight layers ({names[0]}..{names[-1]}) "
            f"and every stage needs at least one: S={stages} stages is not in [1, {len(names)}]"
        )
    if not boundaries:
        return tuple(names[i] for i in balanced_starts([macs for _, macs in layers], stages))
    if len(boundaries) != stages - 1:
        raise ConfigError(
            f"config key 'pipeline.boundaries': {len(boundaries)} boundaries {list(boundaries)} cut "
            f"{len(boundaries) + 1} stages, but S={stages} stages need {stages - 1}"
        )
    unknown = [b for b in boundaries if b not in names[1:]]
    if unknown:
        raise ConfigError(
            f"config key 'pipeline.boundaries': {unknown} are not weight layers a stage can start at "
            f"(one of {names[1:]})"
        )
    index = [names.index(b) for b in boundaries]
    if index != sorted(set(index)):
        raise ConfigError(
            f"config key 'pipeline.boundaries': {list(boundaries)} must be distinct and in the network's "
            f"order (layer positions {index})"
        )
    return (names[0], *boundaries)


def balanced_starts(macs: list[int], stages: int) -> list[int]:
    """The start index of each of ``stages`` contiguous groups of ``macs`` that minimises the
    largest group's sum (exact dynamic programme; the network has 8 weight layers)."""
    n = len(macs)
    prefix = [0]
    for m in macs:
        prefix.append(prefix[-1] + m)
    # best[k][i]: the smallest largest-group sum of the first i layers in k groups, and its starts.
    best = {(0, 0): (0, [])}
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            options = []
            for j in range(k - 1, i):
                if (k - 1, j) in best:
                    worst, starts = best[(k - 1, j)]
                    options.append((max(worst, prefix[i] - prefix[j]), [*starts, j]))
            best[(k, i)] = min(options)
    return best[(stages, n)][1]


def stage_layers(children: list[str], cuts: tuple[str, ...], stage: int) -> list[str]:
    """The names of the children (in the reference model's order) stage ``stage`` holds."""
    first = children.index(cuts[stage])
    end = children.index(cuts[stage + 1]) if stage + 1 < len(cuts) else len(children)
    return children[first:end]


def reference_children(spec: AlexNetSpec) -> list[str]:
    with torch.device("meta"):
        return [name for name, _ in AlexNet(spec).named_children()]


def boundary_shape(spec: AlexNetSpec, cuts: tuple[str, ...], stage: int, rows: int) -> tuple[int, ...]:
    """The shape of one micro-batch's input to stage ``stage`` (what stage-1 sends it)."""
    return (rows, *spec.layer_inputs()[cuts[stage]])


# -- the stage's module -----------------------------------------------------------------------
class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands the input's gradient on contiguous (a channels_last
    gradient out of conv's backward would otherwise reach the point-to-point send, which needs
    contiguous memory)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class StageModule(nn.Sequential):
    """One stage's layers with the reference model's names (``conv3.weight`` ...), so state dicts
    map one to one onto the reference's.  Its output (when another stage reads it) and its
    input's gradient are contiguous: they cross the boundary as plain buffers."""

    def __init__(self, layers: OrderedDict, first: bool, last: bool):
        super().__init__(layers)
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.first:
            x = _ContiguousGrad.apply(x)
        x = super().forward(x)
        return x if self.last else x.contiguous()


def stage_module(reference: AlexNet, children: list[str], cuts: tuple[str, ...], stage: int) -> StageModule:
    named = dict(reference.named_children())
    layers = OrderedDict((name, named[name]) for name in stage_layers(children, cuts, stage))
    return StageModule(layers, first=stage == 0, last=stage == len(cuts) - 1)


# -- what the schedule did -------------------------------------------------------------------
@dataclass
class Action:
    kind: str  # "F" (forward) or "B" (backward) of one micro-batch
    microbatch: int
    start: float  # perf_counter seconds
    end: float


@dataclass
class StepTrace:
    """One step's actions on one stage, from the schedule's own calls."""

    started: float = 0.0
    ended: float = 0.0
    actions: list[Action] = field(default_factory=list)
    in_flight: int = 0  # micro-batches forwarded, not yet backwarded (activations held)
    max_in_flight: int = 0

    @property
    def wall(self) -> float:
        return self.ended - self.started

    @property
    def busy(self) -> float:
        return sum(a.end - a.start for a in self.actions)

    @property
    def idle_fraction(self) -> float:
        """The stage's share of the step spent not computing: waiting for a neighbour (the bubble)
        and the boundary transfers themselves."""
        return max(0.0, 1.0 - self.busy / self.wall) if self.wall > 0 else 0.0


def bubble_theory(stages: int, microbatches: int) -> float:
    """The idle fraction of an ideal pipeline (equal stages, free links): (S-1)/(M+S-1)."""
    return (stages - 1) / (microbatches + stages - 1)


class InstrumentedStage(PipelineStage):
    """PyTorch's ``PipelineStage``, recording its actions and the bytes it sends, and calling
    ``before_forward(microbatch)`` before each micro-batch's forward."""

    def __init__(self, *args, stats: CommStats, before_forward, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats, self.before_forward = stats, before_forward
        self.trace = StepTrace()

    def start_step(self) -> None:
        self.trace = StepTrace(started=time.perf_counter())

    def end_step(self) -> None:
        self.trace.ended = time.perf_counter()

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        self.before_forward(fwd_chunk_id)
        start = time.perf_counter()
        out = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        self._record("F", fwd_chunk_id, start)
        self.trace.in_flight += 1
        self.trace.max_in_flight = max(self.trace.max_in_flight, self.trace.in_flight)
        return out

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        start = time.perf_counter()
        out = super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
        self._record("B", bwd_chunk_id, start)
        self.trace.in_flight -= 1
        return out

    def _record(self, kind: str, microbatch: int, start: float) -> None:
        self.trace.actions.append(Action(kind, microbatch, start, time.perf_counter()))

    def get_fwd_send_ops(self, fwd_chunk_id: int):
        return self._counted(super().get_fwd_send_ops(fwd_chunk_id))

    def get_bwd_send_ops(self, bwd_chunk_id: int):
        return self._counted(super().get_bwd_send_ops(bwd_chunk_id))

    def _counted(self, ops):
        for op in ops:
            self.stats.count(op.tensor.numel() * op.tensor.element_size())
        return ops


def make_schedule(name: str, stage: PipelineStage, microbatches: int, loss_fn):
    """PyTorch's schedule ``name`` over ``stage``.  ``scale_grads``: every micro-batch's loss is a
    mean over its rows and the gradients are divided by M after the last backward, so they are
    those of the mean over the replica's rows, as in every other split mode."""
    return SCHEDULES[name](stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)


def scaled_cross_entropy(scaler):
    """The loss the last stage backpropagates from: cross-entropy, times the gradient scaler's
    scale under fp16 (the schedule runs backward itself, so the scaling that accelerator.backward
    does elsewhere happens here; the optimizer step unscales as usual)."""

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, target)
        return scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss

    return loss_fn


def step_loss(losses: list[torch.Tensor], scaler) -> torch.Tensor:
    """The step's loss from the micro-batches' (each a mean over as many rows): their mean,
    unscaled."""
    loss = torch.stack([x.detach().float() for x in losses]).mean()
    if scaler is not None and scaler.is_enabled():
        loss = loss / scaler.get_scale()
    return loss


# -- reference-shaped tensors ---------------------------------------------------------------
def gather_stages(tensors: dict[str, torch.Tensor], group, ranks: list[int], device) -> dict[str, torch.Tensor]:
    """Collective over a replica's stages (``ranks``: their global ranks, in stage order): every
    stage gets every stage's tensors, in stage order (= the reference model's order)."""
    held = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    every = [None] * len(ranks)
    dist.all_gather_object(every, held, group=group)
    out = {}
    for owner, names in zip(ranks, every, strict=True):
        for name, (shape, dtype) in names.items():
            if name in tensors:  # channels_last kernels are sent as plain contiguous buffers
                t = tensors[name].detach().clone(memory_format=torch.contiguous_format)
            else:
                t = torch.empty(shape, dtype=dtype, device=device)
            with record_function(PROFILE_LABEL):
                dist.broadcast(t, src=owner, group=group)
            out[name] = t
    return out
