"""Placement: decided and validated here, once.

``Placement`` knows the world (W processes), the mesh (replicas x towers), this
rank's coordinates, the device, and how to wrap the reference model for the
split mode.  Nothing else in distalex branches on the split mode.

Mesh layout for model-parallel: rank = replica * T + tower, so the towers of
one replica are neighbouring ranks (one machine, fast links) and a tower's
replicas are T ranks apart (docs/design.md, "Mesh").

hybrid: a one-dimensional mesh of W ranks that is both the data-parallel
dimension of conv1..conv5 (each rank its B/W rows, DDP over the replicated
parameters only) and the model-parallel dimension of fc6..fc8 (each rank 1/W
of the units); see :mod:`distalex.parallel.hybrid`.
"""

from __future__ import annotations

import gc
import importlib
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from distalex.errors import ConfigError
from distalex.model.alexnet import AlexNet, AlexNetSpec, init_weights, spec_from_config
from distalex.parallel import hybrid
from distalex.parallel.towers import CommStats, TowerAlexNet, ddp_bytes_per_step, gather_tensors, shard_state_dict
from distalex.runtime import determinism
from distalex.runtime.elastic import init_for_restarts
from distalex.runtime.precision import resolve_precision


@dataclass(frozen=True)
class Mesh:
    world_size: int
    replicas: int  # data-parallel copies of the model (or of a tower group); in hybrid, of the convolutions
    tower_ranks: int  # processes per replica, each holding one tower (1 unless model-parallel with W > 1)
    fc_shards: int = 1  # hybrid: ranks that split fc6..fc8 by units (W); 1 otherwise

    @staticmethod
    def plan(
        split_mode: str,
        world_size: int,
        towers: int,
        global_batch: int,
        mixed_precision: str,
        cuda: bool,
        processes_per_node: int = 1,
        gpus: int = 0,
        fc_units: int | None = None,
        width: float | None = None,
    ) -> Mesh:
        """Validate the numbers; raise ConfigError showing those that do not add up.
        ``processes_per_node`` and ``gpus`` (visible on this node) matter on CUDA only;
        ``fc_units`` (at ``model.width`` = ``width``) is checked in hybrid mode."""
        if mixed_precision == "fp16" and not cuda:
            raise ConfigError(
                "config key 'train.mixed_precision': fp16 needs a CUDA device (none here); use bf16 or no"
            )
        if cuda and processes_per_node > gpus:
            # accelerate would put rank r on cuda:(r % gpus): two ranks on one GPU, which NCCL refuses.
            raise ConfigError(
                f"{processes_per_node} processes on this node but {gpus} visible GPU(s): NCCL cannot share "
                f"a GPU between processes; launch at most {gpus} per node (accelerate launch "
                f"--num_processes), or run on the CPU with CUDA_VISIBLE_DEVICES=''"
            )
        if split_mode == "single":
            if world_size != 1:
                raise ConfigError(
                    f"split_mode=single runs one process but {world_size} were "
                    f"launched; use --split-mode ddp, model-parallel or hybrid"
                )
            return Mesh(1, 1, 1)
        if split_mode == "ddp":
            mesh = Mesh(world_size, world_size, 1)
        elif world_size == 1:  # model-parallel and hybrid: single-device fallback
            mesh = Mesh(1, 1, 1)
        elif split_mode == "hybrid":
            if fc_units is not None and fc_units % world_size:
                raise ConfigError(
                    f"hybrid splits fc6/fc7's units over the processes: {fc_units} units "
                    f"(model.width={width}) are not divisible by W={world_size} processes "
                    f"({fc_units} % {world_size} = {fc_units % world_size})"
                )
            mesh = Mesh(world_size, world_size, 1, fc_shards=world_size)
        else:
            if world_size % towers:
                raise ConfigError(
                    f"model-parallel needs a world size that is a multiple of model.towers: "
                    f"W={world_size} processes, T={towers} towers, {world_size} % {towers} = "
                    f"{world_size % towers}"
                )
            mesh = Mesh(world_size, world_size // towers, towers)
        if global_batch % mesh.replicas:
            what = f"W={mesh.replicas} processes" if mesh.fc_shards > 1 else f"{mesh.replicas} replicas"
            raise ConfigError(
                f"config key 'train.batch_size': the global batch {global_batch} is not divisible "
                f"by {what} ({global_batch} % {mesh.replicas} = {global_batch % mesh.replicas})"
            )
        return mesh


@dataclass
class Placement:
    split_mode: str
    mesh: Mesh
    rank: int
    device: torch.device
    spec: AlexNetSpec
    tower_group: dist.ProcessGroup | None = None  # this replica's towers
    replica_group: dist.ProcessGroup | None = None  # this tower's replicas (hybrid: all ranks)
    shard_group: dist.ProcessGroup | None = None  # hybrid: the ranks that split fc6..fc8 (all ranks)
    control_group: dist.ProcessGroup | None = None  # gloo, all ranks: host-side flags
    notices: list = field(default_factory=list)
    exchange_stats: CommStats = field(default_factory=CommStats)  # bytes the tower/hybrid exchanges send
    ddp: DDPOptions | None = None  # how DDP exchanges gradients (None: PyTorch's defaults)
    _comm: dict = field(default_factory=dict)  # the latest figures of comm_bytes_per_step

    @property
    def replica(self) -> int:
        return self.rank // self.mesh.tower_ranks

    @property
    def tower(self) -> int:
        return self.rank % self.mesh.tower_ranks

    @property
    def tower_parallel(self) -> bool:
        return self.mesh.tower_ranks > 1

    @property
    def fc_sharded(self) -> bool:
        """hybrid with W > 1: fc6..fc8 split over the ranks."""
        return self.mesh.fc_shards > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model ------------------------------------------------------------------------
    def build_model(self, init: str, seed: int) -> nn.Module:
        """The reference model initialised identically on every rank, then (for
        model-parallel) cut to this rank's tower, (for hybrid) to this rank's fc
        shards.  Not yet wrapped for DDP."""
        torch.manual_seed(seed)
        reference = AlexNet(self.spec)
        init_weights(reference, init)
        if self.tower_parallel:
            model = TowerAlexNet(self.spec, self.tower, self.tower_group, self.exchange_stats)
        elif self.fc_sharded:
            model = hybrid.HybridAlexNet(
                self.spec, self.rank, self.mesh.fc_shards, self.shard_group, self.exchange_stats
            )
        else:
            return reference.to(self.device)
        model.load_state_dict(self.local_tensors(reference.state_dict()))
        return model.to(self.device)

    def wrap(self, model: nn.Module, accelerator) -> nn.Module:
        """DDP across replicas.  In model-parallel mode only over *this tower's*
        replicas: tower A is never averaged with tower B (docs/design.md,
        "Guarantees"), which is why accelerate's prepare (DDP over all ranks)
        is not used there.  In hybrid mode over the replicated parameters only
        (conv1..conv5, fc8's bias): the fc shards are never averaged."""
        if self.fc_sharded:
            ignore = [n for n, _ in model.named_parameters() if not hybrid.is_replicated(n)]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        if self.mesh.replicas > 1:
            synced = [p for n, p in model.named_parameters() if not self.fc_sharded or hybrid.is_replicated(n)]
            options = self.ddp or DDPOptions()
            self._comm["ddp_bytes_per_step"] = options.bytes_per_step(synced, self.mesh.replicas)
        if self.mesh.replicas > 1 and not (self.tower_parallel or self.fc_sharded):
            return accelerator.prepare_model(model)  # DDP options: make_accelerator's DistributedDataParallelKwargs
        if self.mesh.replicas > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            options = self.ddp or DDPOptions()
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, process_group=self.replica_group, **options.ddp_kwargs()
            )
            options.register_hook(ddp, self.replica_group)  # this tower's replicas only
            return ddp
        return model

    def inference_model(self, model: nn.Module) -> nn.Module:
        """The module evaluation runs (a collective in hybrid mode): the model itself,
        or in hybrid mode the reference model with the fc shards gathered, so that
        evaluation is plain data parallelism (each rank its own share, any size)."""
        if self.fc_sharded:
            return hybrid.reference_view(model)
        return model

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

    def min_over_ranks(self, value: int) -> int:
        """The smallest of one integer over all ranks, on every rank (like :meth:`any_rank`)."""
        return self._reduce_host(value, dist.ReduceOp.MIN)

    def _reduce_host(self, value: int, op) -> int:
        if self.mesh.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=op, group=self.control_group)
        return int(t.item())

    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference-shaped copies of per-parameter tensors (a collective in model-parallel and hybrid)."""
        if self.tower_parallel:
            return gather_tensors(tensors, self.tower_group, self.mesh.tower_ranks)
        if self.fc_sharded:
            return gather_tensors(tensors, self.shard_group, self.mesh.fc_shards, dim_of=hybrid.shard_dim)
        return {k: v.detach().clone() for k, v in tensors.items()}

    def local_tensors(self, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of reference-shaped tensors."""
        if self.tower_parallel:
            return shard_state_dict(reference, self.tower, self.mesh.tower_ranks)
        if self.fc_sharded:
            return shard_state_dict(reference, self.rank, self.mesh.fc_shards, dim_of=hybrid.shard_dim)
        return reference

    # -- communication figures ----------------------------------------------------------
    def comm_bytes_per_step(self, steps: int) -> dict[str, int]:
        """Bytes this rank sent per training step over the last ``steps`` steps: DDP's
        gradient all-reduce (from the parameter count, ring accounting) and the tower
        or hybrid exchanges as counted while they ran (not counted under torch.compile)."""
        sent = self.exchange_stats.pop() // max(steps, 1)
        if sent:
            self._comm["hybrid_bytes_per_step" if self.fc_sharded else "tower_bytes_per_step"] = sent
        return dict(self._comm)

    def comm_summary(self) -> dict[str, int]:
        """The latest figures of :meth:`comm_bytes_per_step`, without reading the counters."""
        return dict(self._comm)

    def discard_comm(self) -> None:
        """Forget the bytes counted so far (evaluation's exchanges are not training traffic)."""
        self.exchange_stats.pop()

    def barrier(self) -> None:
        if self.mesh.world_size > 1:
            dist.barrier()


@dataclass(frozen=True)
class DDPOptions:
    """``cfg.ddp`` as DDP takes it: the wrapper's keywords and a communication hook.

    The hooks are PyTorch's (``torch.distributed.algorithms.ddp_comm_hooks``):
    bf16/fp16 round each gradient bucket to 16 bits for the all-reduce and back;
    PowerSGD all-reduces a rank-r factorisation of each gradient matrix, keeping
    what it drops as error feedback for the next step.
    """

    comm_hook: str = "none"
    bucket_cap_mb: float | None = None
    gradient_as_bucket_view: bool = False
    powersgd_rank: int = 1
    powersgd_start_iter: int = 1000

    @staticmethod
    def from_config(cfg, gloo: bool) -> DDPOptions:
        """Validated against the network: PowerSGD over gloo needs every gradient in one
        bucket.  Its hook chains collectives from completion callbacks, and with several
        buckets two ranks can issue them in different orders, which gloo cannot match
        (seen here as a size-mismatch abort in about one run in five)."""
        g = cfg.ddp
        cap = g.bucket_cap_mb
        if g.comm_hook == "powersgd" and gloo:
            from distalex.model.flops import layer_counts

            grads_mb = sum(layer.params for layer in layer_counts(spec_from_config(cfg))) * 4 / 2**20
            if cap is None:
                cap = float(math.ceil(grads_mb) + 1)
            elif cap < grads_mb:
                raise ConfigError(
                    f"config key 'ddp.bucket_cap_mb': ddp.comm_hook=powersgd over gloo needs one gradient "
                    f"bucket, but {cap} MiB holds less than the {grads_mb:.1f} MiB of gradients; unset it "
                    f"or set it >= {math.ceil(grads_mb)}"
                )
        return DDPOptions(g.comm_hook, cap, g.gradient_as_bucket_view, g.powersgd_rank, g.powersgd_start_iter)

    def bytes_per_step(self, params, replicas: int) -> int:
        """Bytes one replica sends per step in DDP's all-reduce of ``params`` (ring accounting), with
        this hook: 4 per gradient element, 2 with bf16/fp16; PowerSGD once it compresses
        (from ``powersgd_start_iter``): its P and Q factors, and the tensors it leaves whole."""
        shapes = [p.shape for p in params if p.requires_grad]
        if self.comm_hook in ("bf16", "fp16"):
            return ddp_bytes_per_step(sum(s.numel() for s in shapes), replicas, element_size=2)
        if self.comm_hook != "powersgd":
            return ddp_bytes_per_step(sum(s.numel() for s in shapes), replicas)
        sent = 0
        for shape in shapes:
            n = shape[0] if len(shape) else 1
            m = shape.numel() // n
            rank = min(n, m, self.powersgd_rank)
            # PyTorch's rule (min_compression_rate 2): compress when it at least halves the tensor.
            sent += (n + m) * rank if (n + m) * rank * 2 < n * m else n * m
        return ddp_bytes_per_step(sent, replicas)

    def ddp_kwargs(self) -> dict:
        out = {"gradient_as_bucket_view": self.gradient_as_bucket_view}
        if self.bucket_cap_mb is not None:
            out["bucket_cap_mb"] = self.bucket_cap_mb
        return out

    def _powersgd_options(self) -> dict:
        return {"matrix_approximation_rank": self.powersgd_rank, "start_powerSGD_iter": self.powersgd_start_iter}

    def register_hook(self, ddp_model, group) -> None:
        """Register the hook on a DDP model whose replicas are ``group``."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        if self.comm_hook == "bf16":
            ddp_model.register_comm_hook(group, default_hooks.bf16_compress_hook)
        elif self.comm_hook == "fp16":
            ddp_model.register_comm_hook(group, default_hooks.fp16_compress_hook)
        elif self.comm_hook == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=group, **self._powersgd_options())
            ddp_model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)

    def accelerate_kwargs(self):
        """The same for accelerate's prepare (DDP over every rank)."""
        from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

        hooks = {
            "none": DDPCommunicationHookType.NO,
            "bf16": DDPCommunicationHookType.BF16,
            "fp16": DDPCommunicationHookType.FP16,
            "powersgd": DDPCommunicationHookType.POWER_SGD,
        }
        kwargs = DistributedDataParallelKwargs(
            gradient_as_bucket_view=self.gradient_as_bucket_view,
            comm_hook=hooks[self.comm_hook],
            comm_state_option=self._powersgd_options() if self.comm_hook == "powersgd" else {},
        )
        if self.bucket_cap_mb is not None:
            kwargs.bucket_cap_mb = self.bucket_cap_mb
        return kwargs


def make_accelerator(cfg, log_with=None, project_dir=None):
    """The process group (every group gets ``train.timeout_s``), this rank's device,
    then the precision ``auto`` stands for on that device (distalex/runtime/precision.py)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    determinism.configure(cfg.train.deterministic, cfg.train.cudnn_benchmark)  # before CUDA starts
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Imported before the process group exists, on purpose: imported after it (torch.optim's
        # and DDP's constructors import it), torch._dynamo leaves a reference to
        # the default group that destroy_process_group() does not release (torch 2.14.1,
        # measured), so the group's gloo threads outlive the run -- see shutdown().
        importlib.import_module("torch._dynamo")

    cuda = torch.cuda.is_available()
    timeout = timedelta(seconds=cfg.train.timeout_s)
    init_for_restarts(timeout, cuda)  # before accelerate, which then adopts the group
    state = PartialState(cpu=not cuda, timeout=timeout)  # sets this rank's device
    return Accelerator(
        cpu=not cuda,
        mixed_precision=resolve_precision(cfg.train.mixed_precision, state.device),
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timeout),
            DDPOptions.from_config(cfg, gloo=not cuda).accelerate_kwargs(),
        ],
    )


def processes_per_node(accelerator) -> int:
    """Processes of this job on this node (the launcher says; at least this rank's local index + 1)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "0")), accelerator.local_process_index + 1)


def setup(cfg, accelerator) -> Placement:
    world = accelerator.num_processes
    spec = spec_from_config(cfg)
    spec.check()
    cuda = accelerator.device.type == "cuda"
    mesh = Mesh.plan(
        cfg.split_mode,
        world,
        cfg.model.towers,
        cfg.train.batch_size,
        accelerator.mixed_precision,
        cuda,
        processes_per_node=processes_per_node(accelerator),
        gpus=torch.cuda.device_count() if cuda else 0,
        fc_units=spec.fc_units,
        width=cfg.model.width,
    )
    placement = Placement(cfg.split_mode, mesh, accelerator.process_index, accelerator.device, spec)
    placement.ddp = DDPOptions.from_config(cfg, gloo=accelerator.device.type != "cuda")
    if cfg.ddp.comm_hook != "none" and mesh.replicas == 1:
        placement.notices.append(f"ddp.comm_hook={cfg.ddp.comm_hook} has no effect: this run has one replica")
    if cfg.split_mode == "model-parallel" and world == 1:
        placement.notices.append(
            f"model-parallel with 1 process: single-device fallback, all {cfg.model.towers} towers "
            f"as grouped convolutions on {accelerator.device}"
        )
    if cfg.split_mode == "hybrid" and world == 1:
        placement.notices.append(
            f"hybrid with 1 process: single-device fallback, the whole model on {accelerator.device}"
        )
    timeout = timedelta(seconds=cfg.train.timeout_s)
    placement.tower_group, placement.replica_group = process_groups(mesh, timeout)
    if mesh.fc_shards > 1:
        # The exchanges get a group of their own, apart from DDP's: each keeps its own order of collectives.
        placement.shard_group = dist.new_group(list(range(world)), timeout=timeout)
    if world > 1:
        cpu = dist.get_backend() == "gloo"
        placement.control_group = dist.group.WORLD if cpu else dist.new_group(backend="gloo", timeout=timeout)
    return placement


def process_groups(mesh: Mesh, timeout: timedelta):
    """(tower group, replica group) of this rank on the mesh replicas x towers.

    Every group gets ``timeout``: a group created without one gets the backend's
    default (10 min NCCL, 30 min gloo), not the world group's, and a hung (not
    dead) rank would stall its tower or replica partners that long."""
    if mesh.tower_ranks > 1:
        t, r = mesh.tower_ranks, mesh.replicas
        towers_of_replica = [[rep * t + k for k in range(t)] for rep in range(r)]
        replicas_of_tower = [[rep * t + k for rep in range(r)] for k in range(t)]
        tower_group, _ = dist.new_subgroups_by_enumeration(towers_of_replica, timeout=timeout)
        replica_group, _ = dist.new_subgroups_by_enumeration(replicas_of_tower, timeout=timeout)
        return tower_group, replica_group
    if mesh.replicas > 1:
        return None, dist.group.WORLD
    return None, None


def shutdown() -> None:
    """Stop every process group's threads while the interpreter is fully alive.

    ``destroy_process_group`` forgets the groups but stops no thread: a gloo group's
    worker and transport threads end only in its destructor, when the last
    reference to it goes, and DDP's reducer, the device mesh and the trainer's
    placement hold such references, partly in reference cycles that only the
    garbage collector frees.  Left to interpreter teardown, a gloo thread that
    drops its last finished work then needs the GIL of a finalizing interpreter;
    Python ends such a thread with ``pthread_exit``, whose unwinding through a
    ``noexcept`` C++ frame calls ``std::terminate``: a finished rank dies with
    SIGABRT ("terminate called without an active exception") now and then.  So
    the groups are destroyed, then the run's objects are collected here, which
    runs the destructors that join those threads (they release the GIL to do so).
    The caller must hold no reference to the run (the trainer) any more."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
