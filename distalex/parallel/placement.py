"""Placement: one object per split mode, chosen once, behind one small interface.

A placement knows the mesh (:mod:`distalex.parallel.mesh`), this rank's
coordinates, the device and the process groups, and answers everything the
training loop needs to know about where tensors live:

* :meth:`Placement.build_model` -- this rank's module, at the reference model's
  initial weights (a tower, an fc shard, or the whole network);
* :meth:`Placement.wrap` -- DDP over the right processes (or none);
* :meth:`Placement.forward_backward` -- one training step's forward and backward
  on this rank's rows, returning the loss and logits the meters read (a pipeline
  schedule, which owns forward and backward of its micro-batches, overrides it);
* :meth:`Placement.dropout_rows` / :meth:`Placement.dropout_units` -- which slice
  of each dropout layer's global mask this rank's module applies, so that the
  masks do not depend on the placement (:mod:`distalex.model.dropout`);
* :meth:`Placement.full_tensors` / :meth:`Placement.local_tensors` -- reference-shaped
  tensors for checkpoints, and this rank's slices of them;
* :meth:`Placement.inference_model` -- the module evaluation runs;
* :meth:`Placement.comm_bytes_per_step` -- the bytes this rank sent per step.

The loop never branches on the split mode; only :func:`placement_for` does, once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from distalex.config import FSDPConfig
from distalex.data.common import ReplicaShare
from distalex.errors import BadInput, RefusedOnRank
from distalex.model.alexnet import AlexNet, AlexNetSpec, init_weights
from distalex.model.dropout import KeyedDropout
from distalex.model.flops import layer_counts
from distalex.parallel import hybrid, pipeline
from distalex.parallel.comm import CommStats, fsdp_bytes_per_step, input_share_bytes
from distalex.parallel.ddp import DDPOptions
from distalex.parallel.launch import processes_per_node
from distalex.parallel.mesh import Mesh, process_groups
from distalex.parallel.towers import TowerAlexNet, gather_tensors, shard_state_dict

# The profile label around the backward pass (distalex/telemetry/profiling.py files what runs inside it).
BACKWARD = "backward"


@dataclass
class Placement:
    """The whole model on this process, no other process: ``single``, and the fallback
    of every other split mode on one process.  The subclasses change what differs."""

    split_mode: str
    mesh: Mesh
    rank: int
    device: torch.device
    spec: AlexNetSpec
    global_batch: int | None = None  # rows of one optimizer step over all replicas (None: a replica's rows)
    tower_group: dist.ProcessGroup | None = None  # this replica's towers
    replica_group: dist.ProcessGroup | None = None  # this tower's replicas (hybrid: all ranks)
    shard_group: dist.ProcessGroup | None = None  # hybrid: the ranks that split fc6..fc8 (all ranks)
    stage_group: dist.ProcessGroup | None = None  # pipeline: this replica's stages
    control_group: dist.ProcessGroup | None = None  # gloo, all ranks: host-side flags
    notices: list = field(default_factory=list)
    exchange_stats: CommStats = field(default_factory=CommStats)  # bytes the tower/hybrid exchanges send
    input_stats: CommStats = field(default_factory=CommStats)  # bytes sharing the decoded input sends
    ddp: DDPOptions | None = None  # how DDP exchanges gradients (None: PyTorch's defaults)
    _comm: dict = field(default_factory=dict)  # the latest figures of comm_bytes_per_step
    _dropouts: list = field(default_factory=list)  # the placement-invariant dropout layers of the built model
    _dropout_seed: int = 0

    # The metrics key of the bytes this placement's own exchanges send (None: it has none).
    exchange_key: ClassVar[str | None] = None
    # The metrics key of the bytes a replica's processes send sharing their decoded batches.
    input_key: ClassVar[str] = "input_bytes_per_step"
    # Whether the weights may be stored channels_last (train.channels_last); activations may always.
    channels_last_weights: ClassVar[bool] = True

    @property
    def replica(self) -> int:
        return self.rank // self.mesh.inner

    @property
    def tower(self) -> int:
        return self.rank % self.mesh.tower_ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def uses_ddp(self) -> bool:
        """Whether DDP wraps the model (its all-reduce runs inside backward)."""
        return False

    # -- model ------------------------------------------------------------------------
    def build_model(self, init: str, seed: int, channels_last: bool = False) -> nn.Module:
        """This rank's module: the reference model initialised identically on every rank,
        then cut to what this rank holds.  Not yet wrapped for DDP."""
        torch.manual_seed(seed)
        reference = AlexNet(self.spec)
        init_weights(reference, init)
        model = self.local_model(reference.to(self.device))
        if channels_last and self.channels_last_weights:
            model = model.to(memory_format=torch.channels_last)
        self._place_dropout(model, seed)
        return model

    def local_model(self, reference: AlexNet) -> nn.Module:
        """What this rank holds of the initialised ``reference`` (already on this rank's
        device), on the same device."""
        return reference

    def wrap(self, model: nn.Module, accelerator) -> nn.Module:
        """The module the training step runs: ``model`` itself, or DDP around it."""
        return model

    def dropout_rows(self) -> tuple[int, int | None]:
        """(first row, global rows) of the rows this rank's fc layers see: its replica's
        contiguous share of the global batch (docs/design.md, "Data").  Unknown global
        batch (None): the module's input is taken as the whole batch."""
        if self.global_batch is None:
            return 0, None
        return self.replica * (self.global_batch // self.mesh.replicas), self.global_batch

    def dropout_units(self) -> tuple[int, int]:
        """(part, parts): this rank's fc layers hold part ``part`` of ``parts`` equal unit slices."""
        return 0, 1

    def _place_dropout(self, model: nn.Module, seed: int) -> None:
        self._dropouts = [m for m in model.modules() if isinstance(m, KeyedDropout)]
        self._dropout_seed = seed
        for d in self._dropouts:
            d.place(*self.dropout_rows(), self.dropout_units())

    def forward_backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, autocast, backward):
        """One training step (``step``: the number of steps before it) forward and backward on this
        rank's rows of the global batch: (loss, logits), the figures the meters read.  The optimizer
        step is the loop's."""
        for d in self._dropouts:  # masks keyed by (seed, step, layer): the same in every placement
            d.at_step(self._dropout_seed, step)
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        with record_function(BACKWARD):
            backward(loss)
        return loss, logits

    def inference_model(self, model: nn.Module) -> nn.Module:
        """The module evaluation runs; every rank evaluates its own share of the rows."""
        return model

    def all_finite(self, model: nn.Module) -> bool:
        """Whether every parameter this rank holds is finite (no collective)."""
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())

    def memory_bytes(self, model: nn.Module, optimizer) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state (momentum) this process holds now,
        counted from its own tensors (a shard's local part, not the whole it stands for)."""
        params = [local_part(p) for p in model.parameters()]
        grads = [local_part(p.grad) for p in model.parameters() if p.grad is not None]
        state = [local_part(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return {
            "param_bytes": sum(t.numel() * t.element_size() for t in params),
            "grad_bytes": sum(t.numel() * t.element_size() for t in grads),
            "optimizer_bytes": sum(t.numel() * t.element_size() for t in state if t.dim() > 0),
        }

    # -- reference-shaped tensors ------------------------------------------------------
    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference-shaped copies of per-parameter tensors (a collective where parameters are split)."""
        return {k: v.detach().clone() for k, v in tensors.items()}

    def local_tensors(self, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of reference-shaped tensors."""
        return reference

    # -- collectives ------------------------------------------------------------------
    def sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of per-replica figures (towers of a replica hold the same ones)."""
        if self.mesh.replicas > 1:
            dist.all_reduce(t, group=self.replica_group)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is True on any (signals, NaN guard).  On CPU
        tensors over a gloo group, so it never waits for the GPU's queue."""
        return bool(self._reduce_host(int(flag), dist.ReduceOp.MAX))

    def check_together(self, check, *args):
        """``check(*args)`` -- a start-up check with no collective inside -- on every rank; if
        it refused (a :class:`BadInput`) on any rank, every rank raises: the refusing rank its
        own error, the others :class:`RefusedOnRank` with its line and status.  So the main
        process prints a refusal found on another rank once, naming the rank, instead of that
        rank leaving without a word and the others waiting for it until the timeout."""
        failure, result = None, None
        try:
            result = check(*args)
        except BadInput as exc:
            failure = exc
        if self.mesh.world_size == 1:
            if failure is not None:
                raise failure
            return result
        found: list = [None] * self.mesh.world_size
        mine = None if failure is None else (str(failure), failure.exit_code)
        dist.all_gather_object(found, mine, group=self.control_group)
        if failure is not None:
            raise failure
        for rank, entry in enumerate(found):
            if entry is not None:
                raise RefusedOnRank(rank, *entry)
        return result

    def min_over_ranks(self, value: int) -> int:
        """The smallest of one integer over all ranks, on every rank (like :meth:`any_rank`)."""
        return self._reduce_host(value, dist.ReduceOp.MIN)

    def _reduce_host(self, value: int, op) -> int:
        if self.mesh.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=op, group=self.control_group)
        return int(t.item())

    def barrier(self) -> None:
        if self.mesh.world_size > 1:
            dist.barrier()

    # -- the input ------------------------------------------------------------------------
    def input_share(self) -> ReplicaShare:
        """How this replica's processes share the decoding of its batches: not at all when the
        replica is one process (every placement but towers and pipeline stages)."""
        return ReplicaShare()

    def _share_over(self, group, member: int, members: int, train_pixels: str) -> ReplicaShare:
        def gather(part: torch.Tensor) -> torch.Tensor:
            with record_function("comm:input"):  # profile label (distalex/telemetry/profiling.py)
                parts = [torch.empty_like(part) for _ in range(members)]
                dist.all_gather(parts, part.contiguous(), group=group)
                self.input_stats.count(input_share_bytes(part.shape[0] * members, part.shape[1], members))
                return torch.cat(parts)

        return ReplicaShare(member, members, gather, train_pixels)

    # -- communication figures ----------------------------------------------------------
    def comm_bytes_per_step(self, steps: int) -> dict[str, int]:
        """Bytes this rank sent per training step over the last ``steps`` steps: DDP's
        gradient all-reduce (from the parameter count, ring accounting), this placement's
        own exchanges as counted while they ran (not counted under torch.compile), and the
        sharing of the decoded input within a replica."""
        sent = self.exchange_stats.pop() // max(steps, 1)
        if sent and self.exchange_key:
            self._comm[self.exchange_key] = sent
        shared = self.input_stats.pop() // max(steps, 1)
        if shared:
            self._comm[self.input_key] = shared
        return dict(self._comm)

    def comm_summary(self) -> dict[str, int]:
        """The latest figures of :meth:`comm_bytes_per_step`, without reading the counters."""
        return dict(self._comm)

    def discard_comm(self) -> None:
        """Forget the bytes counted so far (evaluation's exchanges are not training traffic)."""
        self.exchange_stats.pop()
        self.input_stats.pop()

    # -- for the subclasses ---------------------------------------------------------------
    def _count_ddp_bytes(self, synced: list[nn.Parameter]) -> None:
        self._comm["ddp_bytes_per_step"] = (self.ddp or DDPOptions()).bytes_per_step(synced, self.mesh.replicas)

    def _gathered_reference(self, model: nn.Module) -> AlexNet:
        """The plain reference model holding ``model``'s weights made whole (a collective where
        they are split): for evaluating data-parallel, any number of rows per rank."""
        with torch.device("meta"):
            reference = AlexNet(self.spec)
        reference.load_state_dict(self.full_tensors(dict(model.state_dict())), assign=True)
        return reference.train(model.training)

    def _ddp_over_replica_group(self, model: nn.Module) -> nn.Module:
        """DDP over this rank's replica group only (not accelerate's prepare, which spans every rank)."""
        options = self.ddp or DDPOptions()
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, process_group=self.replica_group, **options.ddp_kwargs()
        )
        options.register_hook(ddp, self.replica_group)
        return ddp


@dataclass
class ReplicatedPlacement(Placement):
    """``ddp``: the whole model on every process, gradients all-reduced over all of them."""

    @property
    def uses_ddp(self) -> bool:
        return True

    def wrap(self, model: nn.Module, accelerator) -> nn.Module:
        self._count_ddp_bytes(list(model.parameters()))
        return accelerator.prepare_model(model)  # DDP options: make_accelerator's DistributedDataParallelKwargs


@dataclass
class TowerPlacement(Placement):
    """``model-parallel``: one tower of the 2012 layout per process (§3.2, Fig. 2); with more
    processes than towers, each tower is DDP-averaged with its own replicas only."""

    exchange_key: ClassVar[str | None] = "tower_bytes_per_step"

    @property
    def uses_ddp(self) -> bool:
        return self.mesh.replicas > 1

    def local_model(self, reference: AlexNet) -> nn.Module:
        model = TowerAlexNet(self.spec, self.tower, self.tower_group, self.exchange_stats).to(self.device)
        model.load_state_dict(self.local_tensors(reference.state_dict()))
        return model

    def wrap(self, model: nn.Module, accelerator) -> nn.Module:
        """Tower A is never averaged with tower B (docs/design.md, "Guarantees")."""
        if self.mesh.replicas == 1:
            return model
        self._count_ddp_bytes(list(model.parameters()))
        return self._ddp_over_replica_group(model)

    def dropout_units(self) -> tuple[int, int]:
        return self.tower, self.mesh.tower_ranks  # tower-major units, as in the reference model

    def input_share(self) -> ReplicaShare:
        """Every tower needs the replica's whole batch: each decodes a share, all gather them."""
        return self._share_over(self.tower_group, self.tower, self.mesh.tower_ranks, "all")

    def full_tensors(self, tensors):
        return gather_tensors(tensors, self.tower_group, self.mesh.tower_ranks)

    def local_tensors(self, reference):
        return shard_state_dict(reference, self.tower, self.mesh.tower_ranks)


@dataclass
class HybridPlacement(Placement):
    """``hybrid`` (Krizhevsky 2014): conv1..conv5 data-parallel, fc6..fc8 split by units."""

    exchange_key: ClassVar[str | None] = "hybrid_bytes_per_step"

    @property
    def uses_ddp(self) -> bool:
        return True

    def local_model(self, reference: AlexNet) -> nn.Module:
        model = hybrid.HybridAlexNet(self.spec, self.rank, self.mesh.fc_shards, self.shard_group, self.exchange_stats)
        model = model.to(self.device)
        model.load_state_dict(self.local_tensors(reference.state_dict()))
        return model

    def wrap(self, model: nn.Module, accelerator) -> nn.Module:
        """DDP over the replicated parameters only (conv1..conv5, fc8's bias): the fc shards
        are never averaged."""
        ignore = [n for n, _ in model.named_parameters() if not hybrid.is_replicated(n)]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        self._count_ddp_bytes([p for n, p in model.named_parameters() if hybrid.is_replicated(n)])
        return self._ddp_over_replica_group(model)

    def inference_model(self, model: nn.Module) -> nn.Module:
        """The reference model with the fc shards gathered (a collective), so that evaluation
        is plain data parallelism (each rank its own share, any size)."""
        return hybrid.reference_view(model)

    def dropout_rows(self) -> tuple[int, int | None]:
        """fc6 and fc7 run on the whole global batch (exchange 1 gathered every rank's rows)."""
        return 0, self.global_batch

    def dropout_units(self) -> tuple[int, int]:
        return self.rank, self.mesh.fc_shards

    def full_tensors(self, tensors):
        return gather_tensors(tensors, self.shard_group, self.mesh.fc_shards, dim_of=hybrid.shard_dim)

    def local_tensors(self, reference):
        return shard_state_dict(reference, self.rank, self.mesh.fc_shards, dim_of=hybrid.shard_dim)


@dataclass
class PipelinePlacement(Placement):
    """``pipeline``: stage ``rank % S`` of replica ``rank // S`` holds a stretch of layers
    (:mod:`distalex.parallel.pipeline`); PyTorch's schedule runs the micro-batches' forwards and
    backwards; each stage is DDP-averaged with the same stage of the other replicas only."""

    exchange_key: ClassVar[str | None] = "pipeline_bytes_per_step"
    _stage: pipeline.InstrumentedStage | None = None
    _schedule: object = None
    _scaler: object = None

    @property
    def uses_ddp(self) -> bool:
        return self.mesh.replicas > 1

    @property
    def stage(self) -> int:
        return self.rank % self.mesh.stages

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.mesh.stages - 1

    @property
    def replica_rows(self) -> int:
        return self.global_batch // self.mesh.replicas

    def stage_ranks(self) -> list[int]:
        """The global ranks of this replica's stages, in stage order."""
        first = self.replica * self.mesh.stages
        return list(range(first, first + self.mesh.stages))

    def input_share(self) -> ReplicaShare:
        """Only the first stage reads the training images (the others the labels); all stages
        evaluate the replica's rows, so they share the decoding of those."""
        return self._share_over(self.stage_group, self.stage, self.mesh.stages, "first")

    def layers(self) -> list[str]:
        return pipeline.stage_layers(pipeline.reference_children(self.spec), self.mesh.cuts, self.stage)

    def local_model(self, reference: AlexNet) -> nn.Module:
        return pipeline.stage_module(reference, pipeline.reference_children(self.spec), self.mesh.cuts, self.stage)

    def wrap(self, model: nn.Module, accelerator) -> nn.Module:
        """DDP over this stage's replicas (stage A is never averaged with stage B), then the
        stage and PyTorch's schedule over it.  Boundary shapes come from the spec, per micro-batch."""
        inner = model
        if self.mesh.replicas > 1:
            self._count_ddp_bytes(list(model.parameters()))
            inner = self._ddp_over_replica_group(model)
        rows = self.replica_rows // self.mesh.microbatches
        dtype = _boundary_dtype(getattr(accelerator, "mixed_precision", "no"))
        shape = functools.partial(pipeline.boundary_shape, self.spec, self.mesh.cuts, rows=rows)
        last = self.is_last_stage
        # requires_grad marks what has a gradient to send back: every boundary, not the data.
        if self.stage == 0:
            inputs = torch.empty((rows, *self.spec.layer_inputs()["conv1"]), device=self.device)
        else:
            inputs = torch.empty(shape(self.stage), dtype=dtype, device=self.device, requires_grad=True)
        outputs = torch.empty(
            (rows, self.spec.num_classes) if last else shape(self.stage + 1),
            dtype=torch.float32 if last else dtype,
            device=self.device,
            requires_grad=True,
        )
        self._stage = pipeline.InstrumentedStage(
            inner,
            self.stage,
            self.mesh.stages,
            self.device,
            input_args=inputs,
            output_args=outputs,
            group=self.stage_group,
            stats=self.exchange_stats,
            before_forward=self._place_microbatch,
        )
        self._scaler = getattr(accelerator, "scaler", None)
        loss_fn = pipeline.scaled_cross_entropy(self._scaler)
        self._schedule = pipeline.make_schedule(self.mesh.schedule, self._stage, self.mesh.microbatches, loss_fn)
        return inner

    def _place_microbatch(self, microbatch: int) -> None:
        """Before micro-batch ``microbatch``'s forward: its rows of the global batch, for the masks."""
        rows = self.replica_rows // self.mesh.microbatches
        for d in self._dropouts:
            d.place(self.replica * self.replica_rows + microbatch * rows, self.global_batch, (0, 1))

    def forward_backward(self, model, x, y, step, autocast, backward):
        """The schedule runs every micro-batch's forward and backward (``backward`` is not used:
        under fp16 the loss is scaled inside the schedule, :func:`pipeline.scaled_cross_entropy`).
        The step's loss and logits come from the last stage and are broadcast to the replica's
        other stages, so every rank returns the same figures."""
        for d in self._dropouts:
            d.at_step(self._dropout_seed, step)
        self._stage.start_step()
        losses: list[torch.Tensor] = []
        with autocast():
            if self.stage == 0:
                logits = self._schedule.step(x)
            elif self.is_last_stage:
                logits = self._schedule.step(target=y, losses=losses)
            else:
                logits = self._schedule.step()
        self._stage.end_step()
        return self._share_figures(losses, logits)

    def _share_figures(self, losses, logits):
        rows, classes = self.replica_rows, self.spec.num_classes
        if self.is_last_stage:
            loss = pipeline.step_loss(losses, self._scaler)
            packed = torch.cat([loss.reshape(1), logits.detach().float().reshape(-1)])
        else:
            packed = torch.empty(1 + rows * classes, device=self.device)
        with record_function(pipeline.PROFILE_LABEL):
            dist.broadcast(packed, src=self.stage_ranks()[-1], group=self.stage_group)
        return packed[0], packed[1:].view(rows, classes)

    @property
    def last_trace(self) -> pipeline.StepTrace:
        """The latest step's actions on this stage (the bubble, the micro-batches in flight)."""
        return self._stage.trace

    def inference_model(self, model: nn.Module) -> nn.Module:
        """The whole reference model gathered on every rank (a collective over the stages), so
        that evaluation is plain data parallelism."""
        return self._gathered_reference(model)

    def full_tensors(self, tensors):
        return pipeline.gather_stages(tensors, self.stage_group, self.stage_ranks(), self.device)

    def local_tensors(self, reference):
        mine = set(self.layers())
        return {k: v for k, v in reference.items() if k.split(".")[0] in mine}


def _boundary_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the activations crossing a boundary: every stage ends after a weight layer
    (or its ReLU, pool, dropout), whose output autocast computes in the low precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


@dataclass
class ShardedPlacement(Placement):
    """``fsdp``: fully sharded data parallelism (FSDP2's ``fully_shard``).  Every process holds
    1/W of every parameter, its gradient and its momentum; each unit (a conv or fc layer, or
    the whole network) is all-gathered just before it runs and its gradient reduce-scattered
    (averaged) back to the shards.  Data parallel otherwise: each process its rows."""

    exchange_key: ClassVar[str | None] = "fsdp_bytes_per_step"
    # FSDP2 keeps each shard as a flat view of contiguous storage: channels_last weights
    # would not be that (the input and activations still are channels_last).
    channels_last_weights: ClassVar[bool] = False
    unit: str = "layer"
    reshard_after_forward: bool = True
    param_dtype: torch.dtype | None = None  # bf16 runs: gathered weights in bf16, gradients reduced in fp32
    _mesh: object = None

    def local_model(self, reference: AlexNet) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # A one-dimensional mesh over every process: its group is the default (world) group.
        self._mesh = init_device_mesh(self.device.type, (self.mesh.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        units = fsdp_units(reference, self.unit)
        for module in units:
            if module is not reference:
                fully_shard(module, mesh=self._mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        fully_shard(reference, mesh=self._mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        shapes = [[tuple(p.shape) for p in m.parameters()] for m in units]
        per_step = fsdp_bytes_per_step(shapes, self.mesh.world_size, self.reshard_after_forward)
        self._comm[self.exchange_key] = sum(per_step.values())
        return reference

    def full_tensors(self, tensors):
        """The whole tensors (a collective: every shard all-gathered)."""
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in tensors.items()}

    def local_tensors(self, reference):
        """Sharded like the model's parameters (dim 0 over the mesh), from whole tensors every
        rank holds (no communication: each rank keeps its own part)."""
        return {
            k: distribute_tensor(v.detach(), self._mesh, [Shard(0)], src_data_rank=None) for k, v in reference.items()
        }

    def inference_model(self, model: nn.Module) -> nn.Module:
        """The plain reference model with every shard gathered (a collective), so evaluation is
        data parallelism over any number of rows per rank (FSDP's forward would need the same
        number of batches on every rank)."""
        return self._gathered_reference(model)

    def all_finite(self, model: nn.Module) -> bool:
        return all(bool(torch.isfinite(local_part(p)).all()) for p in model.parameters())


def fsdp_units(model: AlexNet, unit: str) -> list[nn.Module]:
    """The modules fully_shard wraps, each gathered as one: every layer with parameters, or the network."""
    if unit == "network":
        return [model]
    return [m for m in model.children() if any(True for _ in m.parameters(recurse=False))]


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process stores (a DTensor's local shard, else ``t``)."""
    return t.to_local() if isinstance(t, DTensor) else t


def placement_for(split_mode: str, mesh: Mesh, rank: int, device: torch.device, spec: AlexNetSpec, **groups):
    """The placement object of a planned mesh: the one place that branches on the layout."""
    if mesh.stages > 1:
        cls = PipelinePlacement
    elif mesh.param_shards > 1:
        cls = ShardedPlacement
    elif mesh.tower_ranks > 1:
        cls = TowerPlacement
    elif mesh.fc_shards > 1:
        cls = HybridPlacement
    elif mesh.replicas > 1:
        cls = ReplicatedPlacement
    else:
        cls = Placement  # single, and the one-process fallback of every mode
    return cls(split_mode, mesh, rank, device, spec, **groups)


def make_placement(
    split_mode: str,
    spec: AlexNetSpec,
    global_batch: int,
    ddp: DDPOptions,
    timeout,
    accelerator,
    pipeline_cfg=None,
    fsdp: FSDPConfig | None = None,
):
    """Plan and validate the mesh for the launched processes, create its process groups
    (every group with ``timeout``) and return this rank's placement.  ``pipeline_cfg``: the
    config's pipeline section (pipeline mode)."""
    world = accelerator.num_processes
    spec.check()
    cuda = accelerator.device.type == "cuda"
    mesh = Mesh.plan(
        split_mode,
        world,
        spec.towers,
        global_batch,
        accelerator.mixed_precision,
        cuda,
        processes_per_node=processes_per_node(accelerator),
        gpus=torch.cuda.device_count() if cuda else 0,
        fc_units=spec.fc_units,
        width=spec.width,
        pipeline=pipeline_cfg,
        layers=[(c.name, c.macs) for c in layer_counts(spec)],
    )
    placement = placement_for(
        split_mode, mesh, accelerator.process_index, accelerator.device, spec, global_batch=global_batch
    )
    placement.ddp = ddp
    if isinstance(placement, ShardedPlacement) and fsdp is not None:
        placement.unit, placement.reshard_after_forward = fsdp.unit, fsdp.reshard_after_forward
        placement.param_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
    placement.notices.extend(_notices(split_mode, mesh, spec, ddp, accelerator.device))
    inner_group, placement.replica_group = process_groups(mesh, timeout)
    if mesh.stages > 1:
        placement.stage_group = inner_group
    else:
        placement.tower_group = inner_group
    if mesh.fc_shards > 1:
        # The exchanges get a group of their own, apart from DDP's: each keeps its own order of collectives.
        placement.shard_group = dist.new_group(list(range(world)), timeout=timeout)
    if world > 1:
        cpu = dist.get_backend() == "gloo"
        placement.control_group = dist.group.WORLD if cpu else dist.new_group(backend="gloo", timeout=timeout)
    return placement


def _notices(split_mode: str, mesh: Mesh, spec: AlexNetSpec, ddp: DDPOptions, device) -> list[str]:
    out = []
    if ddp.comm_hook != "none" and mesh.replicas == 1:
        out.append(f"ddp.comm_hook={ddp.comm_hook} has no effect: this run has one replica")
    if mesh.world_size == 1 and split_mode == "model-parallel":
        out.append(
            f"model-parallel with 1 process: single-device fallback, all {spec.towers} towers "
            f"as grouped convolutions on {device}"
        )
    elif mesh.world_size == 1 and split_mode in ("hybrid", "pipeline", "fsdp"):
        out.append(f"{split_mode} with 1 process: single-device fallback, the whole model on {device}")
    elif split_mode == "pipeline" and mesh.stages == 1:
        out.append(f"pipeline with 1 stage: data parallelism over {mesh.replicas} replicas (as ddp)")
    if mesh.stages > 1:
        cuts = ", ".join(mesh.cuts)
        out.append(
            f"pipeline: {mesh.replicas} replica(s) x {mesh.stages} stages starting at {cuts}; "
            f"{mesh.microbatches} micro-batches, {mesh.schedule}"
        )
    return out
