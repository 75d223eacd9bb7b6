"""Placement: decided and validated here, once.

``Placement`` knows the world (W processes), the mesh (replicas x towers), this
rank's coordinates, the device, and how to wrap the reference model for the
split mode.  Nothing else in distalex branches on the split mode.

Mesh layout for model-parallel: rank = replica * T + tower, so the towers of
one replica are neighbouring ranks (one machine, fast links) and a tower's
replicas are T ranks apart (docs/design.md, "Mesh").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from distalex.errors import ConfigError
from distalex.model import AlexNet, AlexNetSpec, init_weights, spec_from_config
from distalex.towers import CommStats, TowerAlexNet, ddp_bytes_per_step, gather_tensors, shard_state_dict


@dataclass(frozen=True)
class Mesh:
    world_size: int
    replicas: int  # data-parallel copies of the model (or of a tower group)
    tower_ranks: int  # processes per replica, each holding one tower (1 unless model-parallel with W > 1)

    @staticmethod
    def plan(
        split_mode: str, world_size: int, towers: int, global_batch: int, mixed_precision: str, cuda: bool
    ) -> Mesh:
        """Validate the numbers; raise ConfigError showing those that do not add up."""
        if mixed_precision == "fp16" and not cuda:
            raise ConfigError(
                "config key 'train.mixed_precision': fp16 needs a CUDA device (none here); use bf16 or no"
            )
        if split_mode == "single":
            if world_size != 1:
                raise ConfigError(
                    f"split_mode=single runs one process but {world_size} were "
                    f"launched; use --split-mode ddp or model-parallel"
                )
            return Mesh(1, 1, 1)
        if split_mode == "ddp":
            mesh = Mesh(world_size, world_size, 1)
        elif world_size == 1:  # model-parallel single-device fallback
            mesh = Mesh(1, 1, 1)
        else:
            if world_size % towers:
                raise ConfigError(
                    f"model-parallel needs a world size that is a multiple of model.towers: "
                    f"W={world_size} processes, T={towers} towers, {world_size} % {towers} = "
                    f"{world_size % towers}"
                )
            mesh = Mesh(world_size, world_size // towers, towers)
        if global_batch % mesh.replicas:
            raise ConfigError(
                f"config key 'train.batch_size': the global batch {global_batch} is not divisible "
                f"by {mesh.replicas} replicas ({global_batch} % {mesh.replicas} = "
                f"{global_batch % mesh.replicas})"
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
    replica_group: dist.ProcessGroup | None = None  # this tower's replicas
    control_group: dist.ProcessGroup | None = None  # gloo, all ranks: host-side flags
    notices: list = field(default_factory=list)
    exchange_stats: CommStats = field(default_factory=CommStats)  # bytes the tower exchanges send
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
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model ------------------------------------------------------------------------
    def build_model(self, init: str, seed: int) -> nn.Module:
        """The reference model initialised identically on every rank, then (for
        model-parallel) cut to this rank's tower.  Not yet wrapped for DDP."""
        torch.manual_seed(seed)
        reference = AlexNet(self.spec)
        init_weights(reference, init)
        if not self.tower_parallel:
            return reference.to(self.device)
        tower = TowerAlexNet(self.spec, self.tower, self.tower_group, self.exchange_stats)
        tower.load_state_dict(shard_state_dict(reference.state_dict(), self.tower, self.mesh.tower_ranks))
        return tower.to(self.device)

    def wrap(self, model: nn.Module, accelerator) -> nn.Module:
        """DDP across replicas.  In model-parallel mode only over *this tower's*
        replicas: tower A is never averaged with tower B (docs/design.md,
        "Guarantees"), which is why accelerate's prepare (DDP over all ranks)
        is not used there."""
        if self.mesh.replicas > 1:
            options = self.ddp or DDPOptions()
            self._comm["ddp_bytes_per_step"] = options.bytes_per_step(model, self.mesh.replicas)
        if self.mesh.replicas > 1 and not self.tower_parallel:
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

    # -- collectives ------------------------------------------------------------------
    def sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of per-replica figures (towers of a replica hold the same ones)."""
        if self.mesh.replicas > 1:
            dist.all_reduce(t, group=self.replica_group)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is True on any (signals, NaN guard).  On CPU
        tensors over a gloo group, so it never waits for the GPU's queue."""
        if self.mesh.world_size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(t.item())

    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference-shaped copies of per-parameter tensors (a collective in model-parallel)."""
        if self.tower_parallel:
            return gather_tensors(tensors, self.tower_group, self.mesh.tower_ranks)
        return {k: v.detach().clone() for k, v in tensors.items()}

    def local_tensors(self, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of reference-shaped tensors."""
        if self.tower_parallel:
            return shard_state_dict(reference, self.tower, self.mesh.tower_ranks)
        return reference

    # -- communication figures ----------------------------------------------------------
    def comm_bytes_per_step(self, steps: int) -> dict[str, int]:
        """Bytes this rank sent per training step over the last ``steps`` steps: DDP's
        gradient all-reduce (from the parameter count, ring accounting) and the tower
        exchanges as counted while they ran (not counted under torch.compile)."""
        sent = self.exchange_stats.pop() // max(steps, 1)
        if sent:
            self._comm["tower_bytes_per_step"] = sent
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
            from distalex.flops import layer_counts

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

    def bytes_per_step(self, model: nn.Module, replicas: int) -> int:
        """Bytes one replica sends per step in DDP's all-reduce (ring accounting), with
        this hook: 4 per gradient element, 2 with bf16/fp16; PowerSGD once it compresses
        (from ``powersgd_start_iter``): its P and Q factors, and the tensors it leaves whole."""
        shapes = [p.shape for p in model.parameters() if p.requires_grad]
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
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    return Accelerator(
        cpu=not cuda,
        mixed_precision=cfg.train.mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s)),
            DDPOptions.from_config(cfg, gloo=not cuda).accelerate_kwargs(),
        ],
    )


def setup(cfg, accelerator) -> Placement:
    world = accelerator.num_processes
    spec = spec_from_config(cfg)
    spec.check()
    mesh = Mesh.plan(
        cfg.split_mode,
        world,
        cfg.model.towers,
        cfg.train.batch_size,
        cfg.train.mixed_precision,
        torch.cuda.is_available(),
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
    placement.tower_group, placement.replica_group = process_groups(mesh, accelerator.device.type)
    if world > 1:
        cpu = dist.get_backend() == "gloo"
        placement.control_group = dist.group.WORLD if cpu else dist.new_group(backend="gloo")
    return placement


def process_groups(mesh: Mesh, device_type: str):
    """(tower group, replica group) of this rank: a DeviceMesh replicas x towers."""
    if mesh.tower_ranks > 1:
        from torch.distributed.device_mesh import init_device_mesh

        device_mesh = init_device_mesh(
            device_type, (mesh.replicas, mesh.tower_ranks), mesh_dim_names=("replica", "tower")
        )
        return device_mesh.get_group("tower"), device_mesh.get_group("replica")
    if mesh.replicas > 1:
        return None, dist.group.WORLD
    return None, None


def shutdown() -> None:
    """Tear the process groups down before the interpreter exits: left to
    interpreter teardown, gloo's threads can abort the process (SIGABRT,
    "terminate called without an active exception") after a successful run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
