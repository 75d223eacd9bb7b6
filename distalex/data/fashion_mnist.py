"""Fashion-MNIST: find the four original IDX files, verify them, load them as uint8 tensors.

Looked for in ``data.root`` when it is set (an explicit choice is never
silently replaced), else ``$DISTALEX_DATA``, else Debian's
``dataset-fashion-mnist`` path, else torchvision's download when a network is
there.  Every file is checked by the md5 of its *unpacked* contents.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from distalex.data.memory import InMemoryDataset
from distalex.errors import DataError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
# md5 of the *unpacked* IDX files: Debian re-compressed the .gz files, so the
# archives' checksums differ from torchvision's while their contents do not.
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
HOW_TO_GET = (
    "install it with 'apt-get install dataset-fashion-mnist' (files land in "
    f"{DEBIAN_FASHION_MNIST}), or point data.root / $DISTALEX_DATA at a folder "
    "holding the four original IDX files (.gz or unpacked)"
)


def _candidate_dirs(base: str) -> list[Path]:
    """The folders under one base where the files may lie (as given, Debian's, torchvision's)."""
    p = Path(base).expanduser()
    return [p, p / "fashion-mnist", p / "FashionMNIST" / "raw"]


def _missing(directory: Path) -> list[str]:
    return [stem for stem in FASHION_MNIST_FILES if _find_file(directory, stem) is None]


def _search(base: str, tried: list[str], partial: list[str]) -> Path | None:
    """The first folder under ``base`` holding all four files; folders holding only
    some of them are described in ``partial`` (which files are missing)."""
    for directory in _candidate_dirs(base):
        tried.append(str(directory))
        missing = _missing(directory)
        if not missing:
            return directory
        if len(missing) < len(FASHION_MNIST_FILES):
            partial.append(f"{directory} lacks {', '.join(missing)} (.gz or unpacked)")
    return None


def _find_file(directory: Path, stem: str) -> Path | None:
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


def _parse_idx(raw: bytes) -> np.ndarray:
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def locate_fashion_mnist(root: str | None, warnings: list[str] | None = None) -> Path:
    """First folder (data.root, else $DISTALEX_DATA, else the Debian path) holding all four files.

    An explicit data.root is never replaced by another folder.  A $DISTALEX_DATA
    that does not hold the files adds one line to ``warnings`` (naming what is
    missing there) before the Debian path is tried."""
    tried: list[str] = []
    partial: list[str] = []
    if root:
        found = _search(root, tried, partial)
        if found is not None:
            return found
        if partial:
            raise DataError(f"Fashion-MNIST in data.root is incomplete: {partial[0]}; {HOW_TO_GET}")
        raise DataError(f"Fashion-MNIST not found (looked in: {', '.join(tried)}); {HOW_TO_GET}")
    env = os.environ.get("DISTALEX_DATA")
    if env:
        found = _search(env, tried, partial)
        if found is not None:
            return found
        why = partial[0] if partial else f"none of {', '.join(tried)} holds the four files"
        if warnings is not None:
            warnings.append(f"$DISTALEX_DATA={env} is set but holds no Fashion-MNIST ({why}); looking elsewhere")
    found = _search(DEBIAN_FASHION_MNIST, tried, partial)
    if found is not None:
        return found
    downloaded = _try_torchvision_download()
    if downloaded is not None:
        return downloaded
    incomplete = f"; {'; '.join(partial)}" if partial else ""
    raise DataError(f"Fashion-MNIST not found (looked in: {', '.join(tried)}{incomplete}); {HOW_TO_GET}")


def _try_torchvision_download() -> Path | None:
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


def load_fashion_mnist(root: str | None, warnings: list[str] | None = None) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train, test) as uint8 [N, 1, 28, 28] images and int64 labels, verified."""
    directory = locate_fashion_mnist(root, warnings)
    arrays = {}
    for stem, md5 in FASHION_MNIST_FILES.items():
        path = _find_file(directory, stem)
        raw = _read_bytes(path)
        digest = hashlib.md5(raw).hexdigest()
        if digest != md5:
            raise DataError(
                f"Fashion-MNIST file {path} is corrupt (md5 of its contents {digest}, expected {md5}); {HOW_TO_GET}"
            )
        arrays[stem] = _parse_idx(raw)

    def split(prefix: str) -> InMemoryDataset:
        images = torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte"].copy()).unsqueeze(1)
        labels = torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte"].astype(np.int64))
        return InMemoryDataset(images, labels, FASHION_MNIST_CLASSES)

    return split("train"), split("t10k")
