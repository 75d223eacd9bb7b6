#!/usr/bin/env python
"""GPU check of ``data.decode=gpu``: nvJPEG's crops against the CPU path's, and the speed.

    python bench/gpu_decode_check.py                  # on a CUDA machine; ~1-2 min
    python bench/gpu_decode_check.py --images 64      # shorter

1. **Bound.** For the same (seed, epoch, index) the device path (``torchvision.io.decode_jpeg``
   batched on CUDA, full-size decode, antialiased resize on the device) and the CPU path
   (libjpeg-turbo through PIL, reduced DCT scale where allowed, PIL's resize of the crop's
   window) must give the same crop geometry and pixels within a bound that only a GPU can
   measure: nvJPEG and libjpeg-turbo differ in their IDCT and chroma upsampling.  Printed per
   image set (ImageNet-sized 500x375; 1000x750, which the CPU decodes at half scale): the mean
   and max absolute difference in uint8 levels, and the same for a window one pixel off (what
   a geometry bug would look like).
2. **Routing.** PNG, grayscale and CMYK JPEGs go to the CPU in the worker and give the CPU
   path's crops exactly.
3. **Speed.** Training samples per second of the whole ``ImageFolderLoader`` epoch with
   ``data.decode=gpu`` and with ``data.decode=cpu`` (uint8 pipeline), ``--workers`` DataLoader
   workers each, and of the batched decode call alone.

Prints a table and writes JSON (``$OUT/gpu_decode_check.json`` or bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distalex.config import load_config
from distalex.data.common import GlobalBatchPlan
from distalex.data.imagefolder import ImageFolderLoader, PCALighting, scan_split
from distalex.data.pixels import CropSamples, CropTransform, EncodedSamples, collate_encoded, decode_batch

HERE = Path(__file__).resolve().parent


def natural_image(rng, w, h):
    import importlib.util

    spec = importlib.util.spec_from_file_location("input_pipeline", HERE / "input_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.natural_image(rng, w, h)


def write_set(root: Path, n: int, size: tuple[int, int], seed: int, extras: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    d = root / "train" / "c0"
    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(natural_image(rng, *size)).save(d / f"{i:05d}.jpg", quality=90)
    if extras:
        img = Image.fromarray(natural_image(rng, *size))
        img.save(d / "x_png.png")
        img.convert("L").save(d / "x_gray.jpg", quality=90)
        img.convert("CMYK").save(d / "x_cmyk.jpg", quality=90)
    return root


def compare(root: Path, device: torch.device, resize: int, size: int) -> dict:
    samples = scan_split(root / "train")[1]
    crop = CropTransform(resize, size, PCALighting(0.1))
    enc, cpu = EncodedSamples(samples, crop, seed=0), CropSamples(samples, crop, seed=0)
    items = [enc[(i, 0)] for i in range(len(samples))]
    got = decode_batch(collate_encoded(items), size, device).cpu()
    diffs, shifted, routed, exact = [], [], {}, True
    for i, (path, _) in enumerate(samples):
        ref = cpu[(i, 0)][0].permute(2, 0, 1).int()  # [S, S, 3] -> [3, S, S]
        a = got[i].permute(2, 0, 1).int()
        routed[Path(path).name] = items[i][0]
        if items[i][0] == "crop":
            exact &= bool(torch.equal(a, ref))
            continue
        diffs.append((a - ref).abs().float())
        shifted.append((a[..., 1:] - ref[..., :-1]).abs().float().mean().item())
    d = torch.stack(diffs)
    return {
        "images": len(diffs),
        "mean_abs_levels": round(d.mean().item(), 3),
        "p99_abs_levels": round(d.flatten().kthvalue(int(0.99 * d.numel())).values.item(), 1),
        "max_abs_levels": int(d.max().item()),
        "one_pixel_off_mean_levels": round(float(np.mean(shifted)), 2),
        "fallbacks_exact": exact,
        "routed": {k: v for k, v in routed.items() if k.startswith("x_")},
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(root: Path, decode: str, workers: int, batch: int, device) -> float:
    cfg = load_config(
        None,
        [
            "data.name=imagefolder",
            f"data.decode={decode}",
            f"data.num_workers={workers}",
            f"train.batch_size={batch}",
            "model.in_channels=3",
        ],
    )
    samples = scan_split(root / "train")[1]
    batch = min(batch, len(samples))
    loader = ImageFolderLoader(samples, cfg, GlobalBatchPlan(len(samples), batch, seed=0), device)
    for _ in loader.epoch(0):  # warm: workers started, CUDA kernels and nvJPEG initialised
        break
    sync(device)
    start, n = time.perf_counter(), 0
    for x, _ in loader.epoch(1):
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - start)


def decode_rate(root: Path, device, batch: int) -> float:
    from torchvision.io import ImageReadMode, decode_jpeg

    files = sorted((root / "train").rglob("*.jpg"))[:batch]
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    sync(device)
    return 10 * len(data) / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--dry-run-on-cpu", action="store_true", help="the same code with the decode on the CPU")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run_on_cpu:
        print("gpu_decode_check: no CUDA device; this is a GPU check (--dry-run-on-cpu to try the script)")
        return 2
    device = torch.device("cpu" if args.dry_run_on_cpu else "cuda")
    name = "cpu (dry run)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    out: dict = {"device": name, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="gpu_decode_") as tmp:
        imagenet = write_set(Path(tmp, "a"), args.images, (500, 375), 0, extras=True)
        large = write_set(Path(tmp, "b"), max(16, args.images // 8), (1000, 750), 1)
        out["bound_500x375"] = compare(imagenet, device, 256, 224)
        out["bound_1000x750_half_scale_on_cpu"] = compare(large, device, 256, 224)
        out["decode_call_images_per_s"] = round(decode_rate(imagenet, device, args.batch), 1)
        for decode in ("gpu", "cpu") if device.type == "cuda" else ("cpu",):
            out[f"loader_{decode}_samples_per_s"] = round(
                loader_rate(imagenet, decode, args.workers, args.batch, device), 1
            )
    print(json.dumps(out, indent=2))
    dest = Path(os.environ.get("OUT") or HERE / "results")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "gpu_decode_check.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
