"""The mesh: how many processes, replicas, towers and fc shards, decided and validated once.

Mesh layout for model-parallel: rank = replica * T + tower, so the towers of
one replica are neighbouring ranks (one machine, fast links) and a tower's
replicas are T ranks apart (docs/design.md, "Mesh").

hybrid: a one-dimensional mesh of W ranks that is both the data-parallel
dimension of conv1..conv5 (each rank its B/W rows, DDP over the replicated
parameters only) and the model-parallel dimension of fc6..fc8 (each rank 1/W
of the units); see :mod:`distalex.parallel.hybrid`.

pipeline: rank = replica * S + stage, as for towers: the stages of one replica are
neighbouring ranks (their boundaries exchange activations every micro-batch) and a
stage's replicas are S ranks apart; see :mod:`distalex.parallel.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from distalex.errors import ConfigError
from distalex.parallel.pipeline import cut_stages


@dataclass(frozen=True)
class Mesh:
    world_size: int
    replicas: int  # data-parallel copies of the model (or of a tower group); in hybrid, of the convolutions
    tower_ranks: int  # processes per replica, each holding one tower (1 unless model-parallel with W > 1)
    fc_shards: int = 1  # hybrid: ranks that split fc6..fc8 by units (W); 1 otherwise
    stages: int = 1  # pipeline: processes per replica, each holding a stretch of layers (S); 1 otherwise
    microbatches: int = 1  # pipeline: micro-batches of each replica's rows per step (M)
    schedule: str = ""  # pipeline: gpipe | 1f1b
    cuts: tuple[str, ...] = ()  # pipeline: the first weight layer of every stage
    param_shards: int = 1  # fsdp: ranks that each hold 1/W of every parameter (W); 1 otherwise

    @property
    def inner(self) -> int:
        """Processes per replica (towers or stages; 1 for ddp and hybrid)."""
        return self.tower_ranks * self.stages

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
        pipeline=None,
        layers: list[tuple[str, int]] | None = None,
    ) -> Mesh:
        """Validate the numbers; raise ConfigError showing those that do not add up.
        ``processes_per_node`` and ``gpus`` (visible on this node) matter on CUDA only;
        ``fc_units`` (at ``model.width`` = ``width``) is checked in hybrid mode; ``pipeline``
        (the config's pipeline section) and ``layers`` (the weight layers' (name, forward MACs))
        in pipeline mode."""
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
                    f"launched; use --split-mode ddp, model-parallel, hybrid or fsdp"
                )
            return Mesh(1, 1, 1)
        if split_mode == "ddp":
            mesh = Mesh(world_size, world_size, 1)
        elif world_size == 1:  # model-parallel, hybrid, pipeline and fsdp: single-device fallback
            mesh = Mesh(1, 1, 1)
        elif split_mode == "pipeline":
            mesh = _plan_pipeline(world_size, global_batch, pipeline, layers)
        elif split_mode == "fsdp":
            mesh = Mesh(world_size, world_size, 1, param_shards=world_size)
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


def _plan_pipeline(world_size: int, global_batch: int, pipeline, layers) -> Mesh:
    """W = R x S; each replica's rows cut into M micro-batches; the stages cut."""
    boundaries = list(pipeline.boundaries) if pipeline.boundaries else None
    stages = pipeline.stages or (len(boundaries) + 1 if boundaries else world_size)
    if world_size % stages:
        raise ConfigError(
            f"pipeline needs a world size that is a multiple of pipeline.stages: W={world_size} "
            f"processes, S={stages} stages, {world_size} % {stages} = {world_size % stages}"
        )
    cuts = cut_stages(layers, stages, boundaries)
    replicas, m = world_size // stages, pipeline.microbatches
    if global_batch % replicas == 0 and (global_batch // replicas) % m:
        rows = global_batch // replicas
        raise ConfigError(
            f"config key 'pipeline.microbatches': M={m} micro-batches do not divide each replica's "
            f"{rows} rows (global batch {global_batch} / {replicas} replicas; {rows} % {m} = {rows % m})"
        )
    if pipeline.schedule == "1f1b" and m < stages:
        raise ConfigError(
            f"config key 'pipeline.microbatches': pipeline.schedule=1f1b needs at least one micro-batch "
            f"per stage: M={m} < S={stages} stages (use M >= {stages}, or pipeline.schedule=gpipe)"
        )
    if stages == 1:  # one stage: every process holds the whole model (data parallelism)
        return Mesh(world_size, world_size, 1)
    return Mesh(world_size, replicas, 1, stages=stages, microbatches=m, schedule=pipeline.schedule, cuts=cuts)


def process_groups(mesh: Mesh, timeout: timedelta):
    """(inner group, replica group) of this rank on the mesh replicas x towers (or x stages):
    the inner group holds the towers (stages) of this rank's replica, the replica group the
    copies of this rank's tower (stage).

    Every group gets ``timeout``: a group created without one gets the backend's
    default (10 min NCCL, 30 min gloo), not the world group's, and a hung (not
    dead) rank would stall its tower or replica partners that long."""
    if mesh.inner > 1:
        t, r = mesh.inner, mesh.replicas
        towers_of_replica = [[rep * t + k for k in range(t)] for rep in range(r)]
        replicas_of_tower = [[rep * t + k for rep in range(r)] for k in range(t)]
        tower_group, _ = dist.new_subgroups_by_enumeration(towers_of_replica, timeout=timeout)
        replica_group, _ = dist.new_subgroups_by_enumeration(replicas_of_tower, timeout=timeout)
        return tower_group, replica_group
    if mesh.replicas > 1:
        return None, dist.group.WORLD
    return None, None
