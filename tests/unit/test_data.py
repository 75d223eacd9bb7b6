import gzip
import shutil
from pathlib import Path

import pytest
import torch

from distalex.data import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_FILES,
    DataError,
    load_fashion_mnist,
    locate_fashion_mnist,
    make_synthetic,
)

from helpers import device_loader


@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist(None)


def test_real_fashion_mnist_from_debian_path(fmnist):
    train, test = fmnist
    assert len(train) == 60_000 and len(test) == 10_000
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # Not blank: every image has ink, and images differ from each other.
    assert (train.images.flatten(1).amax(1) > 100).all()
    assert train.images[:100].float().std(0).mean() > 20


def _copy_unpacked(dst):
    for stem in FASHION_MNIST_FILES:
        with gzip.open(f"{DEBIAN_FASHION_MNIST}/{stem}.gz") as src, open(dst / stem, "wb") as out:
            shutil.copyfileobj(src, out)


def test_unpacked_copy_loads_and_corrupted_copy_is_refused(tmp_path, fmnist):
    _copy_unpacked(tmp_path)
    train, _ = load_fashion_mnist(str(tmp_path))
    assert torch.equal(train.labels, fmnist[0].labels)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[5000] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-images-idx3-ubyte is corrupt.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))


def test_missing_root_is_not_silently_replaced(tmp_path):
    with pytest.raises(DataError, match="not found.*apt-get install"):
        load_fashion_mnist(str(tmp_path / "nowhere"))


def test_synthetic_is_deterministic_and_learnable_shape():
    a = make_synthetic(64, 10, 1, 28, seed=3)
    b = make_synthetic(64, 10, 1, 28, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, make_synthetic(64, 10, 1, 28, seed=4).images)


def test_global_batches_are_the_same_for_any_replica_count():
    data = make_synthetic(100, 10, 1, 28, seed=0)
    kw = dict(global_batch=8, image_size=32, seed=5, device=torch.device("cpu"))
    whole = list(device_loader(data, replica=0, replicas=1, **kw).epoch(2))
    halves = [list(device_loader(data, replica=r, replicas=2, **kw).epoch(2)) for r in range(2)]
    assert len(whole) == 12  # 100 // 8, the partial batch dropped
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][b][1], halves[1][b][1]]), y)
        assert torch.equal(torch.cat([halves[0][b][0], halves[1][b][0]]), x)
    resumed = list(device_loader(data, replica=0, replicas=1, **kw).epoch(2, start_batch=7))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(resumed, whole[7:], strict=True))
    seen = torch.cat(
        [y for r in range(2) for _, y in device_loader(data, replica=r, replicas=2, **kw).eval_batches(16)]
    )
    assert torch.equal(seen, data.labels)  # evaluation covers every example once


def _link_all(dst, skip=()):
    """A Fashion-MNIST folder of links to the Debian files, without the stems in ``skip``."""
    dst.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES:
        if stem not in skip:
            (dst / f"{stem}.gz").symlink_to(f"{DEBIAN_FASHION_MNIST}/{stem}.gz")
    return dst


@pytest.mark.parametrize(
    "missing", [("t10k-labels-idx1-ubyte",), ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")]
)
def test_incomplete_root_names_the_missing_files(tmp_path, missing):
    root = _link_all(tmp_path / "fm", skip=missing)
    with pytest.raises(DataError) as err:
        locate_fashion_mnist(str(root))
    msg = str(err.value)
    assert "incomplete" in msg and str(root) in msg and "\n" not in msg, msg
    for stem in FASHION_MNIST_FILES:
        assert (stem in msg) == (stem in missing), msg


@pytest.mark.parametrize("kind", ["nonexistent", "empty", "incomplete"])
def test_bad_distalex_data_warns_once_and_falls_back(tmp_path, monkeypatch, kind):
    env = tmp_path / "data"
    if kind == "empty":
        env.mkdir()
    elif kind == "incomplete":
        _link_all(env, skip=("train-labels-idx1-ubyte",))
    monkeypatch.setenv("DISTALEX_DATA", str(env))
    warnings = []
    assert locate_fashion_mnist(None, warnings) == Path(DEBIAN_FASHION_MNIST)
    assert len(warnings) == 1 and "$DISTALEX_DATA" in warnings[0] and str(env) in warnings[0], warnings
    assert "\n" not in warnings[0]
    if kind == "incomplete":
        assert "train-labels-idx1-ubyte" in warnings[0]


def test_good_distalex_data_is_used_without_warning(tmp_path, monkeypatch):
    env = _link_all(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("DISTALEX_DATA", str(tmp_path / "data"))
    warnings = []
    assert locate_fashion_mnist(None, warnings) == env
    assert warnings == []
