"""Placement: decided and validated here, once.

``Placement`` knows the world (W processes), the mesh (replicas x towers), this
rank's coordinates, the device, and how to wrap the reference model for the
split mode.  Nothing else in distalex branches on the split mode.

Mesh layout for model-parallel: rank = replica * T + tower, so the towers of
one replica are neighbouring ranks (one machine, fast links) and a tower's
replicas are T ranks apart (docs/design.md, "Mesh").
"""

from __future__ import annotations

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
            params = sum(p.numel() for p in model.parameters())
            self._comm["ddp_bytes_per_step"] = ddp_bytes_per_step(params, self.mesh.replicas)
        if self.mesh.replicas > 1 and not self.tower_parallel:
            return accelerator.prepare_model(model)
        if self.mesh.replicas > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=self.replica_group)
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


def make_accelerator(cfg, log_with=None, project_dir=None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    return Accelerator(
        cpu=not cuda,
        mixed_precision=cfg.train.mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s))],
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
