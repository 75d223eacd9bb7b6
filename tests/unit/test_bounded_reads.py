"""Unbounded reads and sizes: a Fashion-MNIST file is streamed and stopped at its known size
(a gzip bomb, a link to a huge sparse file: one line, memory bounded), and a config whose step
cannot fit the machine is refused from a memory estimate with the numbers -- never one that fits."""

from __future__ import annotations

import gzip
import json
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from distalex.config import load_config
from distalex.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES
from distalex.data.fashion_mnist import FASHION_MNIST_BYTES
from distalex.errors import ConfigError
from distalex.model.alexnet import spec_from_config
from distalex.training.memory_estimate import check_fits, estimate, gib

from helpers import PAPER, ROOT, TINY

GIB = 1 << 30
HAVE_DATA = all((Path(DEBIAN_FASHION_MNIST) / f"{stem}.gz").is_file() for stem in FASHION_MNIST_FILES)
# Loads Fashion-MNIST from argv[1] in a fresh process and prints (outcome, seconds, growth of
# the peak RSS in MiB), so the memory a read costs is measured apart from the test process's.
PROBE = """
import json, resource, sys, time
from distalex.data import load_fashion_mnist
from distalex.errors import DataError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    load_fashion_mnist(sys.argv[1])
    outcome = "loaded"
except DataError as exc:
    outcome = str(exc)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps([outcome, time.perf_counter() - t0, grown]))
"""


def _probe(root: Path):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(root)], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _copy_real(root: Path, but: str) -> None:
    root.mkdir()
    for stem in FASHION_MNIST_FILES:
        if stem != but:
            shutil.copy(f"{DEBIAN_FASHION_MNIST}/{stem}.gz", root)


@pytest.mark.skipif(not HAVE_DATA, reason="needs Debian's dataset-fashion-mnist")
def test_a_gzip_bomb_is_refused_with_memory_bounded(tmp_path):
    """train-images-idx3-ubyte.gz unpacking to 2 GiB of zeros (250 gzip members of 8 MiB,
    a 2 MB file): refused once the known size is passed, the peak RSS growing by far less
    than the bomb's size."""
    root = tmp_path / "fm"
    stem = "train-images-idx3-ubyte"
    _copy_real(root, but=stem)
    member = gzip.compress(bytes(8 << 20), compresslevel=1)
    with open(root / f"{stem}.gz", "wb") as fh:
        for _ in range(256):
            fh.write(member)
    outcome, seconds, grown_mib = _probe(root)
    assert f"{stem}.gz is corrupt" in outcome and "more than the" in outcome and "\n" not in outcome, outcome
    expected_mib = FASHION_MNIST_BYTES[stem] / 2**20
    assert grown_mib < expected_mib + 64, (grown_mib, expected_mib)  # the file's size, not the bomb's 2048
    assert seconds < 20


@pytest.mark.skipif(not HAVE_DATA, reason="needs Debian's dataset-fashion-mnist")
def test_a_data_file_linked_to_a_huge_sparse_file_is_refused_from_its_size(tmp_path):
    root = tmp_path / "fm"
    stem = "t10k-images-idx3-ubyte"
    _copy_real(root, but=stem)
    huge = tmp_path / "huge"
    with open(huge, "wb") as fh:
        fh.truncate(50 << 30)  # 50 GiB, sparse: no disk
    (root / stem).symlink_to(huge)
    t0 = time.perf_counter()
    outcome, _, grown_mib = _probe(root)
    assert f"'{root / stem}' cannot be read" in outcome and "larger than" in outcome, outcome
    assert grown_mib < 256 and time.perf_counter() - t0 < 30  # the real train files, nothing of the 50 GiB
    # The same file gzipped is refused too (its size beyond what a gzip of the file can be).
    (root / stem).unlink()
    (root / f"{stem}.gz").symlink_to(huge)
    assert "larger than" in _probe(root)[0]


@pytest.mark.skipif(not HAVE_DATA, reason="needs Debian's dataset-fashion-mnist")
def test_a_short_or_long_unpacked_file_is_corrupt_by_its_size(tmp_path):
    from distalex.data.fashion_mnist import _read_verified

    stem = "t10k-labels-idx1-ubyte"
    real = gzip.decompress(Path(f"{DEBIAN_FASHION_MNIST}/{stem}.gz").read_bytes())
    assert len(real) == FASHION_MNIST_BYTES[stem]
    assert _read_verified(Path(f"{DEBIAN_FASHION_MNIST}/{stem}.gz"), stem) == real
    for contents, needle in ((real[:-1], "contents are"), (real + b"\0", "more than the")):
        path = tmp_path / f"{stem}.gz"
        path.write_bytes(gzip.compress(contents))
        with pytest.raises(Exception, match=needle) as info:
            _read_verified(path, stem)
        assert "is corrupt" in str(info.value)
    path.write_bytes(zlib.compress(real))  # not gzip at all
    with pytest.raises(Exception, match="cannot be read"):
        _read_verified(path, stem)


# -- the memory estimate -----------------------------------------------------------------------
def _estimate(path, overrides=(), world=1, device="cpu", split_mode=None):
    cfg = load_config(path, list(overrides), split_mode)
    return estimate(cfg, spec_from_config(cfg), world, world, device, world)


@pytest.mark.parametrize("config", sorted(str(p) for p in (ROOT / "configs").glob("*.yaml")))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_shipped_config_fits_a_24_gib_machine(config, device):
    """Never refuse a config that fits: the shipped configs (the paper's ImageNet config at 224,
    batch 128, 8 workers included) pass on a 24 GiB machine with a 24 GiB device."""
    for world, mode in ((1, None), (2, "model-parallel"), (2, "ddp")):
        check_fits(_estimate(config, world=world, device=device, split_mode=mode), 24 * GIB, 24 * GIB)


@pytest.mark.parametrize(
    ("config", "override", "needles"),
    [
        (TINY, "data.image_size=100000", ["data.image_size=100000", "activations", "GiB", "machine allows 24 GiB"]),
        (PAPER, "data.resize_size=60000", ["data.resize_size=60000", "loader buffers", "GiB"]),
        (PAPER, "train.batch_size=100000", ["train.batch_size=100000", "activations"]),
        (TINY, "model.width=16", ["model.width=16", "optimizer state"]),
    ],
)
def test_a_config_that_cannot_fit_is_refused_with_the_numbers(config, override, needles):
    est = _estimate(config, [override])
    with pytest.raises(ConfigError) as info:
        check_fits(est, 24 * GIB)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert f"at least {gib(est.on_host)}" in message


def test_gpu_memory_is_checked_on_its_own():
    est = _estimate(TINY, ["data.image_size=4096", "train.batch_size=256"], device="cuda")
    assert est.on_device > 24 * GIB and est.on_host < 24 * GIB  # the model on the device, only loaders on the host
    check_fits(est, 24 * GIB)  # the host alone would take it
    with pytest.raises(ConfigError, match="GPU memory"):
        check_fits(est, 24 * GIB, 24 * GIB)


def test_the_estimate_is_a_lower_bound_of_a_real_run(tmp_path):
    """The figures are a floor: a real run's peak memory is above the estimate (so a config
    that fits is never refused), and not far above (so the estimate means something)."""
    from helpers import QUICK, run_cli

    args = [
        *QUICK, "data.image_size=448", "train.batch_size=256", "data.train_limit=256", "data.test_limit=64",
        "train.max_steps=1", "train.mixed_precision=no",
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run_cli(*args, "tracking.plots=false", f"train.output_dir={tmp_path}/run")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak > before * 1024  # this run set the children's peak (KiB on Linux)
    est = _estimate(TINY, [a for a in args if "=" in a])
    assert est.on_host > 512 << 20  # large beside the interpreter's own few hundred MB
    assert est.on_host < peak < 6 * est.on_host, (est.on_host >> 20, peak >> 20)
