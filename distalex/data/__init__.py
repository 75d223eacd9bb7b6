"""Datasets and their loaders: Fashion-MNIST, synthetic and ImageFolder.

:func:`build_data` turns the config into a :class:`DataBundle` whose loaders
yield this replica's slice of every global batch (:class:`GlobalBatchPlan`).
"""

from __future__ import annotations

import torch

from distalex.data.common import (
    BatchLoader,
    DataBundle,
    GlobalBatchPlan,
    ReplicaShare,
    SharedCheck,
    epoch_permutation,
)
from distalex.data.fashion_mnist import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    load_fashion_mnist,
    locate_fashion_mnist,
)
from distalex.data.memory import DeviceLoader, InMemoryDataset, resize_batch
from distalex.data.synthetic import make_synthetic
from distalex.errors import DataError

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "BatchLoader",
    "DataBundle",
    "DataError",
    "DeviceLoader",
    "GlobalBatchPlan",
    "InMemoryDataset",
    "ReplicaShare",
    "SharedCheck",
    "build_data",
    "build_test_data",
    "epoch_permutation",
    "load_fashion_mnist",
    "locate_fashion_mnist",
    "make_synthetic",
    "resize_batch",
]


def build_data(
    cfg,
    replica: int,
    replicas: int,
    device: torch.device,
    check: SharedCheck | None = None,
    share: ReplicaShare | None = None,
) -> DataBundle:
    """The train and test loaders of ``cfg.data`` for replica ``replica`` of ``replicas``.
    ``check``: how the processes share the start-up check of image files (ImageFolder);
    ``share``: how the processes of one replica share the decoding of its batches (ImageFolder)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.name == "imagefolder":
        from distalex.data.imagefolder import build_imagefolder

        bundle = build_imagefolder(cfg, replica, replicas, device, check, share)
    else:
        bundle = _in_memory(cfg, replica, replicas, device)
    n = bundle.train.plan.n
    if bundle.train.batches_per_epoch == 0:
        raise DataError(
            f"the training set has {n} examples, fewer than one global batch (train.batch_size={t.batch_size})"
        )
    if bundle.num_classes != m.num_classes:
        what = f"ImageFolder {d.root}" if d.name == "imagefolder" else d.name
        raise DataError(f"{what} has {bundle.num_classes} classes but model.num_classes={m.num_classes}")
    return bundle


def _in_memory(cfg, replica: int, replicas: int, device: torch.device) -> DataBundle:
    d, m, t = cfg.data, cfg.model, cfg.train
    warnings: list[str] = []
    if d.name == "fashion_mnist":
        if m.in_channels != 1:
            raise DataError(f"Fashion-MNIST is grayscale: model.in_channels must be 1, got {m.in_channels}")
        train, test = load_fashion_mnist(d.root, warnings)
    else:
        train = make_synthetic(d.synthetic_train_size, m.num_classes, m.in_channels, 28, seed=t.seed + 1)
        test = make_synthetic(d.synthetic_test_size, m.num_classes, m.in_channels, 28, seed=t.seed + 2)
    train, test = train.limit(d.train_limit), test.limit(d.test_limit)

    def loader(dataset: InMemoryDataset) -> DeviceLoader:
        plan = GlobalBatchPlan(len(dataset), t.batch_size, replica, replicas, t.seed)
        return DeviceLoader(dataset, plan, d.image_size, device, channels_last=t.channels_last)

    return DataBundle(loader(train), loader(test), len(train.classes), train.classes, warnings)


def build_test_data(
    cfg,
    replica: int,
    replicas: int,
    device: torch.device,
    check: SharedCheck | None = None,
    share: ReplicaShare | None = None,
) -> tuple[BatchLoader, tuple[str, ...], list[str]]:
    """The evaluation split of ``cfg.data`` alone (Fashion-MNIST's test set, the synthetic
    test set, an ImageFolder's val/): this replica's loader, the class names and warnings."""
    d, m = cfg.data, cfg.model
    if d.name == "imagefolder":
        from distalex.data.imagefolder import build_imagefolder_val

        loader, classes, warnings = build_imagefolder_val(cfg, replica, replicas, device, check, share)
    else:
        bundle = _in_memory(cfg, replica, replicas, device)
        loader, classes, warnings = bundle.test, bundle.classes, bundle.warnings
    if len(classes) != m.num_classes:
        what = f"ImageFolder {d.root}" if d.name == "imagefolder" else d.name
        raise DataError(f"{what} has {len(classes)} classes but model.num_classes={m.num_classes}")
    return loader, classes, warnings
