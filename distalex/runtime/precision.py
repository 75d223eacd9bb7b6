"""Mixed precision: which precision ``auto`` means on this rank's device, and an
optimizer step whose fp16 overflow decision is the same on every rank.

**One skip decision for the whole job.**  With fp16, a gradient scaler
multiplies the loss by a scale before backward and skips the optimizer step
when any gradient overflowed, halving the scale.  Each process owns its own
scaler.  In DDP every replica sees the same all-reduced gradients, so the
scalers happen to agree; with towers they do not: each tower checks only its
own parameters' gradients, and the tower exchanges' backward *adds* gradients
that every tower scaled by its own scale.  One tower's overflow would halve
only that tower's scale, and from then on the sums mix gradients carried at
different scales.  :func:`optimizer_step` therefore unscales, takes the maximum
of the overflow flag over every process of the job (towers, replicas, and any
other placement whose processes share one optimizer step), and only then lets
the scaler step and update: every rank skips together and all scales stay
equal.  It is one scalar all-reduce per step, on the device, without a host
sync (torch's FSDP ``ShardedGradScaler`` does the same).

**``auto`` precision.**  Resolved per rank, on the rank's own device, after
that device is set (:func:`resolve_precision`): a bf16 or fp16 that
``accelerate launch --mixed_precision`` chose; else bf16 where the device
computes it natively (CUDA compute capability >= 8.0; x86 CPUs with
AVX512-BF16 or AMX); else ``no`` (fp32).  Emulated bf16 (pre-Ampere GPUs such as
V100 and T4, AVX512 CPUs without the BF16 extension) is slower than fp32 and is
never chosen; fp16 is never chosen by ``auto`` either (it changes the
optimisation through the loss scale): ask for it with
``train.mixed_precision=fp16``.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.distributed as dist

LAUNCHER_PRECISIONS = ("bf16", "fp16")


def resolve_precision(requested: str, device: torch.device) -> str:
    """``no`` | ``bf16`` | ``fp16``: the precision a run asked for, with ``auto``
    decided for ``device`` (this rank's, already set) as the module says."""
    if requested != "auto":
        return requested
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher in LAUNCHER_PRECISIONS:
        return launcher
    native = cuda_native_bf16(device) if device.type == "cuda" else cpu_native_bf16()
    return "bf16" if native else "no"


def cuda_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware on ``device`` (not on whichever device is current)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_native_bf16() -> bool:
    """bf16 in hardware on this CPU.  On x86 that is AVX512-BF16 or AMX; oneDNN's
    own check (``mkldnn._is_mkldnn_bf16_supported``) also says yes on plain AVX512,
    where bf16 is emulated.  Elsewhere (Arm) oneDNN's check is the hardware's."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def optimizer_step(optimizer, scaler, group: dist.ProcessGroup | None = None) -> None:
    """One optimizer step.  With an enabled gradient scaler: unscale, agree on the
    overflow flag over ``group`` (default: every process of the job), then the
    scaler's step (skipped on every rank or on none) and its update.

    ``optimizer`` may be accelerate's wrapper: the scaler keys its bookkeeping by
    the wrapped optimizer, so that is the one unscaled and stepped (which is what
    the wrapper's own ``step`` does with a scaler)."""
    if scaler is None or not scaler.is_enabled():
        optimizer.step()
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    scaler.unscale_(inner)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        # found_inf lives on the scale's device: a device-side all-reduce, no host sync.
        for found_inf in scaler._found_inf_per_device(inner).values():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    scaler.step(inner)
    scaler.update()
