"""The peak a run's model FLOPs are measured against (one device, one process).

* GPUs: the datasheet's dense peak (no structured sparsity) at the run's
  precision, looked up by the device name.  bf16 and fp16 autocast run on the
  tensor cores; fp32 ("no") uses the TF32 tensor-core peak while cuDNN may use
  TF32 for convolutions (PyTorch's default; the convolutions hold > 95 % of
  AlexNet's FLOPs), else the plain FP32 peak.  A card that is not in the table
  has no peak: the run logs TFLOP/s without MFU and says so once.
* CPUs: measured -- the best rate of square matrix products at the run's
  precision and thread count, a probe of under a second -- and cached per
  machine in ``$XDG_CACHE_HOME/distalex/peak.json`` (``~/.cache`` when unset),
  keyed by CPU model, precision, threads and torch version.  A probe taken while
  the machine is busy (1-minute load average above its cores) reads low and is
  not cached; delete the file to measure again.

``train.peak_tflops`` overrides both (e.g. a card missing from the table).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distalex.errors import DistalexError
from distalex.runtime.io import read_bytes, write_json

CACHE_MAX_BYTES = 1 << 20  # a few hundred bytes per (CPU, precision, threads, torch) entry

# Dense peaks from the vendors' datasheets, TFLOP/s per GPU: (name pattern, {precision: peak}).
# First match wins, so the specific names come before the general ones.  "tf32" is the
# tensor-core peak an fp32 run's convolutions get; "fp32" the CUDA-core peak.
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    # (pattern matched against torch.cuda.get_device_name, the card it stands for, peaks)
    (r"H200 NVL", "NVIDIA H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "NVIDIA H200 SXM", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    (r"H100 NVL", "NVIDIA H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100 PCIe", "NVIDIA H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100", "NVIDIA H100 SXM", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    (r"A100", "NVIDIA A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "NVIDIA L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", "NVIDIA L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "NVIDIA A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    # GeForce: fp16/bf16 with fp32 accumulation (what autocast uses) runs at half the fp16-accumulate rate.
    (r"RTX 4090", "NVIDIA GeForce RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
]

PROBE_SIZES = (256, 512, 1024, 2048)
RESOLVED_PRECISIONS = ("no", "bf16", "fp16")
PROBE_BUDGET_S = 0.8


@dataclass(frozen=True)
class Peak:
    tflops: float  # per device (GPU) or per process at its thread count (CPU)
    source: str  # where the figure comes from, printed at start-up; names the precision
    precision: str | None = None  # the arithmetic it is the peak of (bf16, fp16, tf32, fp32); None: the user's

    def describe(self) -> str:
        return f"peak {self.tflops:.4g} TFLOP/s per process ({self.source})"


def gpu_peak(name: str, precision: str, tf32: bool = True) -> Peak | None:
    """The datasheet peak of the card called ``name`` at ``precision`` (None: not in the table)."""
    key = precision if precision in ("bf16", "fp16") else ("tf32" if tf32 else "fp32")
    for pattern, card, peaks in GPU_PEAKS:
        if re.search(pattern, name):
            return Peak(peaks[key], f"datasheet, {card}, dense {key}", key)
    return None


def cpu_model() -> str:
    try:  # a few KB per core; 16 MiB is thousands of cores
        text = read_bytes("/proc/cpuinfo", what="/proc/cpuinfo", max_bytes=16 << 20).decode("utf-8", "replace")
    except DistalexError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "distalex" / "peak.json"


def measure_matmul_tflops(dtype: torch.dtype, budget_s: float = PROBE_BUDGET_S) -> float:
    """Best TFLOP/s of ``n x n`` matrix products on the CPU with the current thread count.

    Sizes grow from 256 while the budget allows (the largest products run nearest
    the peak); each size gets a share of the budget and keeps its fastest product.
    """
    deadline = time.perf_counter() + budget_s
    best = 0.0
    for i, n in enumerate(PROBE_SIZES):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        torch.mm(a, b)  # warm-up: packing, threads
        first = time.perf_counter() - t0
        best = max(best, 2 * n**3 / first / 1e12)
        share = (deadline - time.perf_counter()) / (len(PROBE_SIZES) - i)
        until = time.perf_counter() + share
        last = first
        while time.perf_counter() + last < until:  # start a product only when it fits
            t0 = time.perf_counter()
            torch.mm(a, b)
            last = time.perf_counter() - t0
            best = max(best, 2 * n**3 / last / 1e12)
        # The next size costs 8x this one: stop when it cannot fit in what is left.
        if 8 * first > deadline - time.perf_counter():
            break
    return best


def cpu_peak(precision: str, threads: int | None = None, path: Path | None = None) -> Peak:
    """Measured matmul peak at ``precision`` (bf16, else fp32) and ``threads``, cached per machine."""
    threads = threads or torch.get_num_threads()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    model = cpu_model()
    key = f"{model} | {name} | {threads} threads | torch {torch.__version__}"
    path = path or cache_path()
    cache, unusable = _read_cache(path)
    what = f"{name} matmul on {model}, {threads} thread{'s' if threads != 1 else ''}"
    if key in cache:
        return Peak(cache[key], f"measured {what}; cached in {path}", name)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tflops = measure_matmul_tflops(dtype)
    finally:
        torch.set_num_threads(previous)
    busy = _busy()
    if unusable:
        # A FIFO, a device or a huge file where the cache belongs: read nothing, write nothing.
        where = f"not cached: {unusable}"
    elif busy:
        # Other programs took cores from the probe: its figure reads low (and MFU high).
        where = f"not cached: {busy}"
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {**_read_cache(path)[0], key: tflops})
            where = f"cached in {path}"
        except OSError as exc:
            where = f"not cached: {path}: {exc.strerror or exc}"
        except DistalexError as exc:  # the guarded writer refused the file
            where = f"not cached: {exc}"
    return Peak(tflops, f"measured {what} just now; {where}", name)


def _busy() -> str | None:
    """Why the machine is too busy for a probe worth keeping (None: it is not)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load > cores:
        return f"the machine was busy (load average {load:.1f} on {cores} cores), the figure may read low"
    return None


def _read_cache(path: Path) -> tuple[dict[str, float], str | None]:
    """The cache's valid entries, and why the file cannot be a cache at all (a FIFO, a
    device, a directory, an oversized file: it is then neither read nor rewritten; the
    reason goes into the peak's one start-up line).  A missing or malformed file is an
    empty cache."""
    try:
        data = json.loads(read_bytes(path, what="peak cache", max_bytes=CACHE_MAX_BYTES).decode("utf-8"))
    except DistalexError as exc:
        missing = getattr(exc, "reason", "") == "it does not exist"
        return {}, None if missing else f"{exc}; ignored (measured afresh, not written)"
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}, None
    if not isinstance(data, dict):
        return {}, None
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    }, None


def device_peak(device: torch.device, precision: str, override: float | None = None) -> tuple[Peak | None, str]:
    """(peak, the line to print at start-up) for one process of the run on ``device``.

    ``precision`` is the one the process trains in (``no``, ``bf16``, ``fp16``), already
    resolved on ``device`` (distalex/runtime/precision.py); ``auto`` is refused, since the
    peak of an unresolved ``auto`` is fp32's and a bf16 run's MFU would read ~2.5x high."""
    if precision not in RESOLVED_PRECISIONS:
        raise ValueError(f"the peak needs the precision the run trains in ({RESOLVED_PRECISIONS}), got {precision!r}")
    if override:
        run = "fp32" if precision == "no" else precision
        peak = Peak(float(override), f"train.peak_tflops, for a {run} run")
        return peak, peak.describe()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, precision, tf32=torch.backends.cudnn.allow_tf32)
        if peak is None:
            return None, (
                f"no datasheet peak for '{name}': MFU omitted (TFLOP/s still logged); "
                f"set train.peak_tflops to the card's dense peak to get it"
            )
        return peak, peak.describe()
    if device.type == "cpu":
        peak = cpu_peak(precision)
        return peak, peak.describe()
    return None, f"no peak known for device type '{device.type}': MFU omitted (TFLOP/s still logged)"
