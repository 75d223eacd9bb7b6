#!/usr/bin/env python
"""Start-up cost of the ImageFolder header check, per 1000 images.

Every ImageFolder run opens each image's header once before its first step
(distalex.data.imagefolder.verify_images; the processes of a run share the
files).  This writes N ImageNet-sized JPEGs (500x375, about 110 KB each) into a
temporary folder and times the check, warm (files in the page cache, the usual
case for a second run) and, where the kernel lets us drop this folder from the
cache (posix_fadvise DONTNEED), cold.  The figure to quote is ms per 1000
images and the disk it was measured on; one process checks all files here, so a
run with W processes pays about 1/W of it.

    python scripts/bench_image_check.py            # 5000 images
    python scripts/bench_image_check.py --quick    # 300 images, to see it work
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from distalex.data.common import SharedCheck
from distalex.data.imagefolder import verify_images
from distalex.telemetry.peak import cpu_model


def make_images(root: Path, n: int, classes: int = 10) -> list:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)  # one noisy photo-sized image, re-encoded
    samples = []
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(exist_ok=True)
        path = folder / f"img{i:06d}.JPEG"
        Image.fromarray(np.roll(base, i, axis=1)).save(path, quality=90)
        samples.append((str(path), i % classes))
    return samples


def drop_from_cache(samples) -> bool:
    ok = hasattr(os, "posix_fadvise")
    for path, _ in samples:
        if not ok:
            break
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


def timed(samples) -> float:
    start = time.perf_counter()
    verify_images(samples, SharedCheck())
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="300 images, one repeat")
    args = ap.parse_args(argv)
    n, repeats = (300, 1) if args.quick else (args.images, args.repeats)
    with tempfile.TemporaryDirectory(prefix="bench_image_check_") as tmp:
        samples = make_images(Path(tmp), n)
        size = sum(os.path.getsize(p) for p, _ in samples) / n
        cold = [timed(samples) for _ in range(repeats) if drop_from_cache(samples)]
        warm = [timed(samples) for _ in range(repeats)]
    result = {
        "images": n,
        "mean_file_kb": round(size / 1024, 1),
        "warm_ms_per_1000": round(min(warm) / n * 1000 * 1000, 1),
        "cold_ms_per_1000": round(min(cold) / n * 1000 * 1000, 1) if cold else None,
        "cpu": cpu_model(),
        "note": "best of the repeats; the tmp folder's disk, one process",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
