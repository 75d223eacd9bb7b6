"""Datasets and the device-resident batch pipeline.

In-memory datasets (Fashion-MNIST, synthetic) keep their uint8 images on the
training device once; each batch is gathered and resized there with
``F.interpolate`` instead of PIL in DataLoader workers (the seed's pipeline).

Batches are planned over the *global* batch: one permutation per epoch from
``(seed, epoch)``, cut into global batches, and replica ``r`` of ``R`` takes the
r-th equal slice of each.  So ``single`` and ``ddp`` with any number of
replicas see the same global batches in the same order (DESIGN.md §5.1), and
the towers of one replica always see the same batch.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
# md5 of the *unpacked* IDX files: Debian re-compressed the .gz files, so the
# archives' checksums differ from torchvision's while their contents do not.
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
HOW_TO_GET = ("install it with 'apt-get install dataset-fashion-mnist' (files land in "
              f"{DEBIAN_FASHION_MNIST}), or point data.root / $DISTALEX_DATA at a folder "
              "holding the four original IDX files (.gz or unpacked)")


class DataError(RuntimeError):
    """Data missing, corrupt or unusable (exit status 2)."""


@dataclass
class InMemoryDataset:
    images: torch.Tensor   # uint8 [N, C, H, W]
    labels: torch.Tensor   # int64 [N]
    classes: Tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def limit(self, n: Optional[int]) -> "InMemoryDataset":
        if n is None or n >= len(self):
            return self
        return InMemoryDataset(self.images[:n], self.labels[:n], self.classes)

    def to(self, device: torch.device) -> "InMemoryDataset":
        return InMemoryDataset(self.images.to(device), self.labels.to(device), self.classes)


# --------------------------------------------------------------------------- Fashion-MNIST

def _candidate_dirs(root: Optional[str]) -> List[Path]:
    """data.root when it is set (an explicit choice is never silently replaced),
    else $DISTALEX_DATA, then Debian's path."""
    dirs = []
    bases = [root] if root else [os.environ.get("DISTALEX_DATA"), DEBIAN_FASHION_MNIST]
    for base in bases:
        if base:
            p = Path(base).expanduser()
            dirs += [p, p / "fashion-mnist", p / "FashionMNIST" / "raw"]
    return dirs


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"Fashion-MNIST file {path} cannot be read ({exc}); {HOW_TO_GET}") from None


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def locate_fashion_mnist(root: Optional[str]) -> Path:
    """First folder (data.root, $DISTALEX_DATA, the Debian path) holding all four files."""
    tried = []
    for directory in _candidate_dirs(root):
        tried.append(str(directory))
        if all(_find_file(directory, stem) for stem in FASHION_MNIST_FILES):
            return directory
    downloaded = None if root else _try_torchvision_download()
    if downloaded is not None:
        return downloaded
    raise DataError(f"Fashion-MNIST not found (looked in: {', '.join(tried)}); {HOW_TO_GET}")


def _try_torchvision_download() -> Optional[Path]:
    """Last resort when a network is there: torchvision's download into a cache dir."""
    if os.environ.get("DISTALEX_NO_DOWNLOAD"):
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distalex"
    try:
        import socket
        socket.create_connection(("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80), timeout=3).close()
        from torchvision.datasets import FashionMNIST
        FashionMNIST(str(cache), train=True, download=True)
        FashionMNIST(str(cache), train=False, download=True)
    except Exception:  # no network (the usual case here): fall through to the error
        return None
    return cache / "FashionMNIST" / "raw"


def load_fashion_mnist(root: Optional[str]) -> Tuple[InMemoryDataset, InMemoryDataset]:
    directory = locate_fashion_mnist(root)
    arrays = {}
    for stem, md5 in FASHION_MNIST_FILES.items():
        path = _find_file(directory, stem)
        raw = _read_bytes(path)
        digest = hashlib.md5(raw).hexdigest()
        if digest != md5:
            raise DataError(f"Fashion-MNIST file {path} is corrupt (md5 of its contents {digest}, "
                            f"expected {md5}); {HOW_TO_GET}")
        arrays[stem] = _parse_idx(raw, path)

    def split(prefix: str) -> InMemoryDataset:
        images = torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte"].copy()).unsqueeze(1)
        labels = torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte"].astype(np.int64))
        return InMemoryDataset(images, labels, FASHION_MNIST_CLASSES)

    return split("train"), split("t10k")


# --------------------------------------------------------------------------- synthetic

def make_synthetic(n: int, num_classes: int, channels: int, side: int, seed: int) -> InMemoryDataset:
    """Deterministic, learnable images: a fixed random template per class plus noise.

    The templates depend only on (num_classes, channels, side), so train and
    test splits made with different seeds share them.
    """
    templates = torch.rand(num_classes, channels, side, side,
                           generator=torch.Generator().manual_seed(1234)) * 200
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.randn(n, channels, side, side, generator=g) * 40
    images = (templates[labels] + noise).clamp_(0, 255).to(torch.uint8)
    return InMemoryDataset(images, labels, tuple(f"class{i}" for i in range(num_classes)))


# --------------------------------------------------------------------------- batching

def resize_batch(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,C,h,w] -> float [B,C,size,size] in [0,1]; bilinear like torchvision's Resize."""
    x = images_u8.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1])
    return x


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class DeviceLoader:
    """Yields this replica's slice of every global batch, resized on the device.

    The last partial global batch of an epoch is dropped in training so that
    every step has the same shape (no recompilation) and the same global batch
    in every placement.  ``batches_per_epoch`` is what a checkpoint's data
    position counts in.
    """

    def __init__(self, dataset: InMemoryDataset, global_batch: int, replica: int, replicas: int,
                 image_size: int, seed: int, device: torch.device, channels_last: bool = False):
        if global_batch % replicas:
            raise ValueError(f"global batch {global_batch} not divisible by {replicas} replicas")
        self.data = dataset.to(device)
        self.global_batch, self.replica, self.replicas = global_batch, replica, replicas
        self.local_batch = global_batch // replicas
        self.image_size, self.seed, self.device = image_size, seed, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batches_per_epoch = len(dataset) // global_batch

    def _batch(self, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = resize_batch(self.data.images[index], self.image_size)
        return x.contiguous(memory_format=self.memory_format), self.data.labels[index]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_permutation(len(self.data), self.seed, epoch).to(self.device)
        lo = self.replica * self.local_batch
        for b in range(start_batch, self.batches_per_epoch):
            start = b * self.global_batch + lo
            yield self._batch(order[start:start + self.local_batch])

    def eval_batches(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Every example once, this replica's contiguous share (sums of counts are exact)."""
        n = len(self.data)
        lo, hi = n * self.replica // self.replicas, n * (self.replica + 1) // self.replicas
        for start in range(lo, hi, batch_size):
            idx = torch.arange(start, min(start + batch_size, hi), device=self.device)
            yield self._batch(idx)


@dataclass
class DataBundle:
    train: object          # DeviceLoader or a loader with the same interface
    test: object
    num_classes: int
    classes: Tuple[str, ...]


def build_data(cfg, replica: int, replicas: int, device: torch.device) -> DataBundle:
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.name == "imagefolder":
        from distalex.imagefolder import build_imagefolder
        return build_imagefolder(cfg, replica, replicas, device)
    if d.name == "fashion_mnist":
        if m.in_channels != 1:
            raise DataError(f"Fashion-MNIST is grayscale: model.in_channels must be 1, got {m.in_channels}")
        train, test = load_fashion_mnist(d.root)
    else:
        train = make_synthetic(d.synthetic_train_size, m.num_classes, m.in_channels, 28, seed=t.seed + 1)
        test = make_synthetic(d.synthetic_test_size, m.num_classes, m.in_channels, 28, seed=t.seed + 2)
    if len(train.classes) != m.num_classes:
        raise DataError(f"{d.name} has {len(train.classes)} classes but model.num_classes={m.num_classes}")
    train, test = train.limit(d.train_limit), test.limit(d.test_limit)
    if len(train) < t.batch_size:
        raise DataError(f"the training set has {len(train)} examples, fewer than one global batch "
                        f"(train.batch_size={t.batch_size})")
    common = dict(global_batch=t.batch_size, replica=replica, replicas=replicas,
                  image_size=d.image_size, seed=t.seed, device=device, channels_last=t.channels_last)
    return DataBundle(DeviceLoader(train, **common), DeviceLoader(test, **common),
                      m.num_classes, train.classes)
