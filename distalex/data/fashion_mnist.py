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
import zlib
from pathlib import Path

import numpy as np
import torch

from distalex.data.memory import InMemoryDataset
from distalex.errors import DataError
from distalex.runtime.io import open_for_reading

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
# Bytes of each unpacked file: the IDX header (4 + 4 per dimension) and the uint8 data of
# 60,000 training / 10,000 test examples of 28 x 28.  Reading stops one byte past these.
FASHION_MNIST_BYTES = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}
CHUNK = 1 << 20  # bytes unpacked and hashed at a time
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


def _packed_cap(size: int) -> int:
    """The most bytes a gzip of ``size`` bytes can take: deflate stores incompressible data in
    blocks of 5 bytes' overhead per 64 KiB, plus the gzip header (with a file name) and trailer."""
    return size + size // 1000 + 4096


def _read_verified(path: Path, stem: str) -> bytes:
    """The unpacked contents of one Fashion-MNIST file, streamed: unpacked and hashed a chunk
    at a time, stopped one byte past the file's known size, so a gzip bomb or a link to a
    huge sparse file costs at most that much memory (a file too large even packed is refused
    from its size before anything is read).  Wrong size or md5: one DataError line."""
    size, md5 = FASHION_MNIST_BYTES[stem], FASHION_MNIST_FILES[stem]
    packed = path.suffix == ".gz"
    buf, digest = bytearray(), hashlib.md5()
    try:
        with open_for_reading(
            path, what="Fashion-MNIST file", max_bytes=_packed_cap(size) if packed else size, error=DataError
        ) as fh:
            stream = gzip.GzipFile(fileobj=fh, mode="rb") if packed else fh
            while chunk := stream.read(min(CHUNK, size + 1 - len(buf))):
                buf += chunk
                digest.update(chunk)
                if len(buf) > size:
                    raise DataError(
                        f"Fashion-MNIST file {path} is corrupt (it unpacks to more than the {size} bytes of "
                        f"{stem}; reading stopped there); {HOW_TO_GET}"
                    )
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"Fashion-MNIST file {path} cannot be read ({exc}); {HOW_TO_GET}") from None
    if len(buf) != size:
        raise DataError(
            f"Fashion-MNIST file {path} is corrupt (its contents are {len(buf)} bytes, {stem} has {size}); {HOW_TO_GET}"
        )
    if digest.hexdigest() != md5:
        raise DataError(
            f"Fashion-MNIST file {path} is corrupt (md5 of its contents {digest.hexdigest()}, expected {md5}); "
            f"{HOW_TO_GET}"
        )
    return bytes(buf)


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
    for stem in FASHION_MNIST_FILES:
        arrays[stem] = _parse_idx(_read_verified(_find_file(directory, stem), stem))

    def split(prefix: str) -> InMemoryDataset:
        images = torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte"].copy()).unsqueeze(1)
        labels = torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte"].astype(np.int64))
        return InMemoryDataset(images, labels, FASHION_MNIST_CLASSES)

    return split("train"), split("t10k")
