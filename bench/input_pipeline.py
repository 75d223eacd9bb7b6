#!/usr/bin/env python
"""The ImageFolder input pipeline per core, side by side: torchvision as users write it,
distalex's float pipeline (the one before the uint8 pipeline) and distalex's uint8 pipeline.

    python bench/input_pipeline.py                 # 384 generated JPEGs + real photos, 5 rounds
    python bench/input_pipeline.py --quick         # a few seconds, to see it work

Training samples per second per core, as samples per CPU-second: every row runs in this one
process with one torch thread and ``num_workers=0`` (the loader's work on the calling thread)
and is timed by the process's CPU time, so a CPU shared with other jobs does not count their
time against it; the rows take turns over ``--rounds`` rounds and the median is quoted.

* ``torchvision RandomResizedCrop`` / ``torchvision Resize+RandomCrop``: ``ImageFolder`` +
  (``RandomResizedCrop(224)`` | ``Resize(256)`` + ``RandomCrop(224)``) + ``RandomHorizontalFlip``
  + ``ToTensor`` + ``Normalize`` in a ``DataLoader``: the standard pipeline.
* ``distalex float``: ``data.pipeline=float``: decode at a reduced DCT scale, resize, crop,
  flip, PCA lighting, mean, all per image in float on the CPU.
* ``distalex uint8``: the default: the CPU makes uint8 crops, the float work is batched on the
  training device -- here the same core, and it is timed (the batch as the network gets it).

Model-parallel (``--towers 2``): two gloo processes, one core each, form one replica; unique
training images per CPU-second of the two together when both decode the whole batch (the
float pipeline, as before) and when each decodes half and they all-gather the uint8 rows.

Images: ``--images`` generated 500x375 JPEGs at quality 90 with natural-image-like 1/f
spectra (~110 KB each, like ImageNet's), and real photos from this machine (matplotlib's
sample photo and any others found, re-cut to 500x375 pieces).  Writes JSON (default
bench/results/input_pipeline.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distalex.config import load_config
from distalex.data.common import GlobalBatchPlan, ReplicaShare
from distalex.data.imagefolder import IMAGENET_MEAN, EpochBatchSampler, ImageFolderLoader, scan_split
from distalex.data.pixels import CropSamples
from distalex.telemetry.peak import cpu_model

STD = (0.229, 0.224, 0.225)
REAL_PHOTOS = [
    "matplotlib/mpl-data/sample_data/grace_hopper.jpg",  # under site-packages
]


def natural_image(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """uint8 [H, W, 3]: 1/f noise (the amplitude spectrum of natural images), colour channels
    correlated, so a JPEG of it costs what a photo costs to decode."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    planes = [
        np.fft.irfft2((rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f, s=(height, width))
        for _ in range(3)
    ]
    mix = np.eye(3) * 0.5 + 0.5  # shared luminance, some colour
    img = np.stack(planes, -1) @ mix.T
    img = (img - img.mean()) / (img.std() + 1e-9)
    return np.clip(128 + 50 * img, 0, 255).astype(np.uint8)


def write_generated(root: Path, n: int, classes: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(natural_image(rng)).save(d / f"{i:05d}.JPEG", quality=90)
    return root


def find_photos() -> list[Path]:
    import site

    found = []
    for base in site.getsitepackages():
        found += [Path(base, p) for p in REAL_PHOTOS if Path(base, p).is_file()]
    return found


def write_real(root: Path, photos: list[Path], n: int, seed: int = 0) -> Path | None:
    """``n`` 500x375 pieces of the real photos (random windows, resized, quality 90)."""
    if not photos:
        return None
    rng = np.random.default_rng(seed)
    images = [Image.open(p).convert("RGB") for p in photos]
    for i in range(n):
        im = images[i % len(images)]
        w, h = im.size
        cw = int(w * rng.uniform(0.6, 1.0))
        ch = min(h, int(cw * 375 / 500))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        piece = im.crop((left, top, left + cw, top + ch)).resize((500, 375), Image.BICUBIC)
        d = root / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        piece.save(d / f"{i:05d}.JPEG", quality=90)
    return root


def cfg_for(root: Path, pipeline: str, batch: int, image: int, resize: int, resampler: str = "pil"):
    return load_config(
        None,
        [
            "data.name=imagefolder",
            f"data.root={root}",
            f"data.image_size={image}",
            f"data.resize_size={resize}",
            f"data.pipeline={pipeline}",
            "data.num_workers=0",
            "data.decode=cpu",
            f"data.resampler={resampler}",
            f"train.batch_size={batch}",
            "model.in_channels=3",
        ],
    )


def distalex_loader(root: Path, pipeline: str, batch: int, image: int, resize: int, share=None, resampler="pil"):
    samples = scan_split(root / "train")[1]
    plan = GlobalBatchPlan(len(samples), batch, seed=0)
    cfg = cfg_for(root, pipeline, batch, image, resize, resampler)
    return ImageFolderLoader(samples, cfg, plan, torch.device("cpu"), share)


def torchvision_loader(root: Path, variant: str, batch: int, image: int, resize: int):
    from torchvision import datasets, transforms

    crop = (
        [transforms.RandomResizedCrop(image)]
        if variant == "rrc"
        else [transforms.Resize(resize), transforms.RandomCrop(image)]
    )
    tf = transforms.Compose(
        [*crop, transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, STD)]
    )
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0, drop_last=True)


def rate(batches) -> float:
    """Samples per CPU-second of this process over every batch of ``batches`` (an iterable of
    (x, y)): per core, and blind to the time other jobs on a shared CPU take from it."""
    n, start = 0, time.process_time()
    for x, *_ in batches:
        n += x.shape[0]
    return n / (time.process_time() - start)


def decode_only(root: Path, resize: int):
    """What every row pays first: the file decoded to RGB (reduced DCT scale where allowed)."""
    from distalex.data.imagefolder import _load_rgb

    for path, label in scan_split(root / "train")[1]:
        img = _load_rgb(path, resize)
        yield torch.empty((1, *img.size)), label


def gpu_decode_worker_side(root: Path, batch: int, image: int, resize: int):
    """data.decode=gpu, the CPU's part only: read the bytes, parse the header, draw the crop
    (the decode, resize and crop then run on the GPU: bench/gpu_decode_check.py)."""
    from distalex.data.imagefolder import PCALighting
    from distalex.data.pixels import CropTransform, EncodedSamples, collate_encoded

    samples = scan_split(root / "train")[1]
    ds = EncodedSamples(samples, CropTransform(resize, image, PCALighting(0.1)), seed=0)
    plan = GlobalBatchPlan(len(samples), batch, seed=0)
    for index in plan.epoch_indices(0):
        enc = collate_encoded([ds[(i, 0)] for i in index.tolist()])
        yield enc.labels, enc.labels


def uint8_worker_side(root: Path, batch: int, image: int, resize: int):
    """The uint8 pipeline's CPU part alone (decode, window resize, crop, flip, collate): what
    the workers of a GPU run do; the float stage then runs on the GPU."""
    ld = distalex_loader(root, "uint8", batch, image, resize)
    dataset = CropSamples(ld.samples, ld.crop_transform, ld.plan.seed)
    sampler = EpochBatchSampler(ld.plan)
    yield from torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)


def single_core_rows(root: Path, args) -> dict:
    rows = {
        "decode only (every row pays it)": lambda: decode_only(root, args.resize),
        "torchvision RandomResizedCrop": lambda: torchvision_loader(root, "rrc", args.batch, args.image, args.resize),
        "torchvision Resize+RandomCrop": lambda: torchvision_loader(root, "rc", args.batch, args.image, args.resize),
        "distalex float (before)": lambda: distalex_loader(root, "float", args.batch, args.image, args.resize).epoch(0),
        "distalex uint8 (now)": lambda: distalex_loader(root, "uint8", args.batch, args.image, args.resize).epoch(0),
        "distalex uint8, resampler=torch": lambda: distalex_loader(
            root, "uint8", args.batch, args.image, args.resize, resampler="torch"
        ).epoch(0),
        "distalex uint8, CPU side only": lambda: uint8_worker_side(root, args.batch, args.image, args.resize),
        "distalex decode=gpu, CPU side only": lambda: gpu_decode_worker_side(root, args.batch, args.image, args.resize),
    }
    times = {k: [] for k in rows}
    for _ in range(args.rounds):
        for name, make in rows.items():
            times[name].append(rate(make()))
    return {name: statistics.median(v) for name, v in times.items()}


# --------------------------------------------------------------------------- model-parallel


def _tower(rank: int, members: int, init: str, root: str, pipeline: str, args, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):  # one core each, as a tower process on its own core
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=members, timeout=timedelta(minutes=5))

    def gather(part):
        parts = [torch.empty_like(part) for _ in range(members)]
        dist.all_gather(parts, part.contiguous())
        return torch.cat(parts)

    share = ReplicaShare(rank, members, gather, "all") if pipeline == "uint8" else None
    cpu_s, images = [], 0
    for _ in range(args.rounds):
        loader = distalex_loader(Path(root), pipeline, args.batch, args.image, args.resize, share)
        dist.barrier()
        start = time.process_time()  # this process's CPU time, gloo's threads included
        images = sum(x.shape[0] for x, _ in loader.epoch(0))
        cpu_s.append(time.process_time() - start)
    Path(out, f"{pipeline}{rank}.json").write_text(json.dumps({"cpu_s": cpu_s, "images": images}))
    dist.destroy_process_group()


def model_parallel_rows(root: Path, args) -> dict:
    """Unique training images per second per core in one replica of ``args.towers`` processes."""
    import torch.multiprocessing as mp

    out = {}
    for pipeline, label in (("float", "model-parallel, float (before)"), ("uint8", "model-parallel, uint8 (now)")):
        with tempfile.TemporaryDirectory() as tmp:
            init = f"file://{tmp}/rendezvous"
            mp.spawn(_tower, args=(args.towers, init, str(root), pipeline, args, tmp), nprocs=args.towers)
            per_rank = [json.loads(Path(tmp, f"{pipeline}{r}.json").read_text()) for r in range(args.towers)]
        # Every rank yields the replica's whole batches: the unique images are one rank's count,
        # the cores' time is the ranks' CPU seconds together.
        images = per_rank[0]["images"]
        out[label] = statistics.median(images / sum(r["cpu_s"][k] for r in per_rank) for k in range(args.rounds))
    return out


# --------------------------------------------------------------------------- report


def table(results: dict) -> str:
    lines = []
    for images, rows in results.items():
        base = rows.get("torchvision RandomResizedCrop")
        lines.append(f"\n{images}")
        lines.append(f"{'pipeline':36s} {'samples/s/core':>15s} {'vs torchvision RRC':>19s}")
        for name, value in rows.items():
            ratio = f"{value / base:.2f}x" if base else "-"
            lines.append(f"{name:36s} {value:15.1f} {ratio:>19s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--towers", type=int, default=2, help="processes of the model-parallel replica (0: skip)")
    ap.add_argument("--quick", action="store_true", help="32 small images, one round: to see it work")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "input_pipeline.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.image, args.resize, args.rounds = 32, 8, 56, 64, 1
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        sets = {"generated 500x375 1/f JPEGs, q90": write_generated(Path(tmp, "gen"), args.images)}
        real = write_real(Path(tmp, "real"), find_photos(), args.images)
        if real is not None:
            sets["real photo pieces 500x375, q90"] = real
        for label, root in sets.items():
            files = list((root / "train").rglob("*.JPEG"))
            kb = sum(f.stat().st_size for f in files) / len(files) / 1024
            name = f"{label} ({len(files)} files, {kb:.0f} KB mean)"
            results[name] = single_core_rows(root, args)
            if args.towers > 1 and root == sets["generated 500x375 1/f JPEGs, q90"]:
                results[name] |= model_parallel_rows(root, args)
    print(
        f"CPU: {cpu_model()}; samples per CPU-second (one core per row: torch threads 1, num_workers 0), "
        f"median of {args.rounds} rounds"
    )
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "args": vars(args), "samples_per_sec_per_core": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
