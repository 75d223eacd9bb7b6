"""What every dataset shares: the global-batch plan, the loader interface, the bundle.

Batches are planned over the *global* batch: one permutation per epoch from
``(seed, epoch)``, cut into global batches, and replica ``r`` of ``R`` takes the
r-th equal slice of each.  So ``single`` and ``ddp`` with any number of
replicas see the same global batches in the same order (docs/design.md,
"Guarantees"), and the processes of one replica (its towers) see the same
batch.  The last partial global batch of an epoch is dropped, so every step
has the same shape in every placement.  Evaluation visits every example once:
replica ``r`` takes the contiguous share ``[n*r//R, n*(r+1)//R)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


@dataclass(frozen=True)
class GlobalBatchPlan:
    """Which examples replica ``replica`` of ``replicas`` sees, batch by batch.

    ``global_batch`` is divisible by ``replicas``: the placement checked it
    (:meth:`distalex.parallel.mesh.Mesh.plan`) before any data was built.
    """

    n: int
    global_batch: int
    replica: int = 0
    replicas: int = 1
    seed: int = 0

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.replicas

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def epoch_indices(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """This replica's indices of every global batch of ``epoch``, from ``start_batch`` on."""
        order = epoch_permutation(self.n, self.seed, epoch)
        lo = self.replica * self.local_batch
        for b in range(start_batch, self.batches_per_epoch):
            start = b * self.global_batch + lo
            yield order[start : start + self.local_batch]

    def eval_range(self) -> range:
        """This replica's contiguous share of the evaluation set (every example once over all replicas)."""
        return range(self.n * self.replica // self.replicas, self.n * (self.replica + 1) // self.replicas)


class BatchLoader(Protocol):
    """What the training loop needs of a dataset's loader."""

    plan: GlobalBatchPlan

    @property
    def batches_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This replica's (images, labels) of every training batch of ``epoch`` from ``start_batch``."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """This replica's share of the evaluation set, in batches of ``batch_size``."""
        ...


@dataclass
class DataBundle:
    train: BatchLoader
    test: BatchLoader
    num_classes: int
    classes: tuple[str, ...]
    warnings: list[str] = field(default_factory=list)  # one line each, for the main process to print


def _same(value: int) -> int:
    return value


@dataclass(frozen=True)
class SharedCheck:
    """How the processes of a run split a check of every input file, and agree on the verdict.

    Process ``rank`` of ``world`` checks every ``world``-th file from ``rank`` on;
    ``min_over_ranks`` (a collective) gives every process the same first bad file,
    so all of them refuse the run with the same message, and none is left waiting
    in a collective for a process that stopped.  ``progress``: show a progress bar.
    """

    rank: int = 0
    world: int = 1
    min_over_ranks: Callable[[int], int] = _same
    progress: bool = False


@dataclass(frozen=True)
class ReplicaShare:
    """How the processes of one replica (model-parallel towers, pipeline stages) share the
    decoding of their replica's batches, which all of them would otherwise decode in full.

    Member ``member`` of ``members`` decodes its share of every batch and ``gather`` (a
    collective over the replica's group, given by the placement, which counts its bytes)
    returns every member's uint8 ``[rows, bytes]`` share concatenated in member order.
    ``train_pixels``: ``"all"`` -- every member needs the training images (towers);
    ``"first"`` -- only member 0 does (the first pipeline stage; the others need the labels,
    which come from the file list, no file opened)."""

    member: int = 0
    members: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    train_pixels: str = "all"
