"""The device-resident pipeline against d2l's, on real Fashion-MNIST.

1. ``resize_batch`` (F.interpolate on the training device) reproduces what the
   d2l chapter feeds its network: torchvision's ``FashionMNIST`` dataset with
   ``Compose([Resize(224), ToTensor()])`` (PIL bilinear in DataLoader workers),
   within a stated tolerance.
2. ``DeviceLoader`` order: the replica slices of every global batch concatenate
   to the single-replica batch, and ``start_batch=k`` continues with exactly
   batch k of the uninterrupted epoch.
"""

import gzip
import shutil

import pytest
import torch
from PIL import Image

from distalex.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES, epoch_permutation, load_fashion_mnist, resize_batch

from helpers import device_loader

CPU = torch.device("cpu")

# Tolerance of resize_batch against torchvision's Resize(224) + ToTensor, in units
# of one grey level (1/255).  Measured on 20,000 real images (the whole test set
# and the first 10,000 training images): max |diff| = 1.000015 levels, mean
# |diff| = 0.175 levels, worst per-image mean 0.30 levels, and no pixel above
# one level.  Why exactly one level: both compute the same half-pixel-centred
# bilinear interpolation (an upscale, so PIL's filter support is not widened and
# antialiasing is a no-op), but PIL works in fixed point and rounds its result
# to uint8 before ToTensor divides by 255, while ours stays float; the two
# roundings can land on neighbouring levels, never further apart.  Bounds, with
# a modest margin: max <= 1.25 levels (anything >= 2 would be a different
# interpolation or an off-by-one in the sampling grid), mean <= 0.25 levels
# (~40% above the measurement).  The bound discriminates: align_corners=True
# differs by 6.7 levels on average, nearest by 8.1, bicubic by 3.2 (max 68-175).
MAX_ABS = 1.25 / 255
MEAN_ABS = 0.25 / 255


@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist(None)


@pytest.fixture(scope="module")
def torchvision_sets(tmp_path_factory):
    """d2l's datasets: torchvision FashionMNIST reading the unpacked IDX files."""
    from torchvision import datasets, transforms

    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in FASHION_MNIST_FILES:
        with gzip.open(f"{DEBIAN_FASHION_MNIST}/{stem}.gz") as src, open(raw / stem, "wb") as out:
            shutil.copyfileobj(src, out)
    trans = transforms.Compose([transforms.Resize(224), transforms.ToTensor()])
    return (
        datasets.FashionMNIST(str(root), train=True, transform=trans, download=False),
        datasets.FashionMNIST(str(root), train=False, transform=trans, download=False),
    )


class DiffStats:
    def __init__(self):
        self.max, self.sum, self.n = 0.0, 0.0, 0

    def add(self, ours: torch.Tensor, ref: torch.Tensor) -> None:
        assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float32
        d = (ours - ref).abs()
        self.max = max(self.max, d.max().item())
        self.sum += d.sum().item()
        self.n += d.numel()

    @property
    def mean(self) -> float:
        return self.sum / self.n


def test_resize_batch_matches_torchvision_resize_totensor(fmnist):
    """The function itself, on 1,000 test and 1,000 training images (PIL directly)."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor()])
    stats = DiffStats()
    for split in fmnist:
        images = split.images[:: len(split) // 1000][:1000]
        for chunk in images.split(250):
            ref = torch.stack([tf(Image.fromarray(im[0].numpy(), mode="L")) for im in chunk])
            stats.add(resize_batch(chunk, 224), ref)
    assert stats.max <= MAX_ABS, f"max |diff| {stats.max * 255:.3f} grey levels"
    assert stats.mean <= MEAN_ABS, f"mean |diff| {stats.mean * 255:.3f} grey levels"
    assert stats.mean > 0.05 / 255  # the comparison did see the rounding (not comparing x with x)


def test_device_loader_batches_equal_the_d2l_datasets_items(fmnist, torchvision_sets):
    """Through the loader: evaluation batches in order, training batches in the
    epoch's permutation, against torchvision's dataset items at the same indices."""
    tv_train, tv_test = torchvision_sets
    train, test = fmnist[0].limit(1024), fmnist[1].limit(512)
    kw = dict(global_batch=128, replica=0, replicas=1, image_size=224, seed=3, device=CPU)
    stats = DiffStats()
    start = 0
    for x, y in device_loader(test, **kw).eval_batches(128):
        ref = [tv_test[i] for i in range(start, start + len(y))]
        stats.add(x, torch.stack([r[0] for r in ref]))
        assert y.tolist() == [r[1] for r in ref]
        start += len(y)
    assert start == 512
    order = epoch_permutation(len(train), 3, 1)
    for b, (x, y) in enumerate(device_loader(train, **kw).epoch(1)):
        if b % 3:  # every third batch keeps the test short
            continue
        ref = [tv_train[int(i)] for i in order[b * 128 : (b + 1) * 128]]
        stats.add(x, torch.stack([r[0] for r in ref]))
        assert y.tolist() == [r[1] for r in ref]
    assert stats.max <= MAX_ABS and stats.mean <= MEAN_ABS, (stats.max * 255, stats.mean * 255)


def test_channels_last_changes_the_layout_not_the_values(fmnist):
    kw = dict(global_batch=64, replica=0, replicas=1, image_size=96, seed=0, device=CPU)
    data = fmnist[1].limit(256)
    a = next(device_loader(data, **kw).epoch(0))[0]
    b = next(device_loader(data, channels_last=True, **kw).epoch(0))[0]
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


@pytest.mark.parametrize("replicas", [2, 4])
def test_replica_slices_concatenate_to_the_single_replica_batch(fmnist, replicas):
    data = fmnist[0].limit(1000)  # 1000 // 64 = 15 batches, the partial one dropped
    kw = dict(global_batch=64, image_size=40, seed=7, device=CPU)
    for epoch in (0, 1):
        whole = list(device_loader(data, replica=0, replicas=1, **kw).epoch(epoch))
        parts = [list(device_loader(data, replica=r, replicas=replicas, **kw).epoch(epoch)) for r in range(replicas)]
        assert len(whole) == 15 and all(len(p) == 15 for p in parts)
        for b, (x, y) in enumerate(whole):
            assert all(p[b][1].shape[0] == 64 // replicas for p in parts)
            assert torch.equal(torch.cat([p[b][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[b][1] for p in parts]), y)
        # One epoch = distinct examples, in the order of the epoch's permutation.
        order = epoch_permutation(len(data), 7, epoch)[: 15 * 64]
        assert torch.equal(torch.cat([y for _, y in whole]), data.labels[order])
    e0 = torch.cat([y for _, y in device_loader(data, replica=0, replicas=1, **kw).epoch(0)])
    e1 = torch.cat([y for _, y in device_loader(data, replica=0, replicas=1, **kw).epoch(1)])
    assert not torch.equal(e0, e1)  # a fresh order each epoch


@pytest.mark.parametrize("replicas", [1, 2])
def test_start_batch_continues_with_exactly_the_next_batch(fmnist, replicas):
    data = fmnist[0].limit(640)  # 10 batches of 64
    kw = dict(global_batch=64, replicas=replicas, image_size=32, seed=11, device=CPU)
    for r in range(replicas):
        whole = list(device_loader(data, replica=r, **kw).epoch(2))
        for k in (0, 1, 5, 9, 10):
            # A fresh loader, as after a resume from a checkpoint taken after k batches.
            resumed = list(device_loader(data, replica=r, **kw).epoch(2, start_batch=k))
            assert len(resumed) == len(whole) - k
            for (xa, ya), (xb, yb) in zip(resumed, whole[k:], strict=True):
                assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_benchmark_baseline_runs_the_same_network_as_distalex():
    """bench/d2l_baseline.py's copy of d2l's nn.Sequential and distalex's
    reference AlexNet (towers 1, width 1) are the same function of the same weights,
    so the benchmark compares pipelines, not networks."""
    import importlib.util

    from distalex.model.alexnet import AlexNet, AlexNetSpec

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("d2l_baseline", ROOT / "bench" / "d2l_baseline.py")
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    d2l, ours = baseline.d2l_net(), AlexNet(AlexNetSpec())
    assert [v.shape for v in d2l.state_dict().values()] == [v.shape for v in ours.state_dict().values()]
    assert sum(p.numel() for p in d2l.parameters()) == 46_764_746
    ours.load_state_dict(dict(zip(ours.state_dict(), d2l.state_dict().values(), strict=True)))
    d2l.eval(), ours.eval()
    x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), d2l(x), rtol=1e-5, atol=1e-6)
