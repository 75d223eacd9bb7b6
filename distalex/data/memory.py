"""In-memory datasets on the training device, resized there per batch.

Fashion-MNIST and the synthetic set keep their uint8 images on the training
device once; each batch is gathered and resized there with ``F.interpolate``
(bilinear, like torchvision's ``Resize``; tested against it) instead of PIL
in DataLoader workers, which is what the d2l pipeline does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function

from distalex.data.common import Batch, GlobalBatchPlan


@dataclass
class InMemoryDataset:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def limit(self, n: int | None) -> InMemoryDataset:
        """The first ``n`` examples (all when ``n`` is unset or large)."""
        if n is None or n >= len(self):
            return self
        return InMemoryDataset(self.images[:n], self.labels[:n], self.classes)

    def to(self, device: torch.device) -> InMemoryDataset:
        return InMemoryDataset(self.images.to(device), self.labels.to(device), self.classes)


def resize_batch(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,C,h,w] -> float [B,C,size,size] in [0,1]; bilinear like torchvision's Resize."""
    x = images_u8.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    return x


class DeviceLoader:
    """Yields this replica's slice of every global batch (see :class:`GlobalBatchPlan`), resized on the device."""

    def __init__(
        self,
        dataset: InMemoryDataset,
        plan: GlobalBatchPlan,
        image_size: int,
        device: torch.device,
        channels_last: bool = False,
    ):
        self.data = dataset.to(device)
        self.plan = plan
        self.image_size, self.device = image_size, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def _batch(self, index: torch.Tensor) -> Batch:
        with record_function("data:gather"):  # profile labels (distalex/telemetry/profiling.py)
            images, labels = self.data.images[index], self.data.labels[index]
        with record_function("data:resize"):
            x = resize_batch(images, self.image_size).contiguous(memory_format=self.memory_format)
        return x, labels

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        for index in self.plan.epoch_indices(epoch, start_batch):
            yield self._batch(index.to(self.device))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        share = self.plan.eval_range()
        for start in range(share.start, share.stop, batch_size):
            yield self._batch(torch.arange(start, min(start + batch_size, share.stop), device=self.device))
