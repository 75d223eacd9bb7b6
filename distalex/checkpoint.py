"""Checkpoints: portable between placements, written atomically, pruned to the last K.

A checkpoint holds the *reference model's* tensors (towers gathered back into
the full layers), the optimizer's per-parameter state keyed by reference
parameter name, the LR schedule, mixed-precision scaler, every rank's RNG
state, the data position (epoch, next batch) and the config.  So it loads into
any placement and into the plain reference model (DESIGN.md §5.4).

Writing: rank 0 writes ``<name>.tmp``, fsyncs, renames to the final name and
fsyncs the folder.  A crash at any moment leaves either the old set of files or
the new complete one - never a half file under a final name (§5.6).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

FORMAT = 1
NAME = re.compile(r"^step_(\d{9})\.pt$")
# Spec fields that change the parameters' shapes or meaning; dropout does not.
ARCH_FIELDS = ("in_channels", "num_classes", "width", "towers", "lrn", "conv1_padding", "image_size")


class CheckpointError(RuntimeError):
    """Checkpoint missing, unreadable or for a different network (exit status 2)."""


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str):
    d = checkpoint_dir(output_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if NAME.match(p.name))


def resolve(resume: Optional[str], output_dir: str) -> Optional[Path]:
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"train.resume: checkpoint '{resume}' does not exist")
    return path


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_ranks(obj, world_size: int):
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def momentum_buffers(model: nn.Module, optimizer) -> Dict[str, torch.Tensor]:
    buffers = {}
    for name, p in unwrap(model).named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            buffers[name] = buf
    return buffers


def build_state(placement, model, optimizer, schedule, scaler, position: dict, stats: dict, config: dict) -> dict:
    """Collective: every rank calls it; the returned dict is complete on rank 0."""
    net = unwrap(model)
    tensors = placement.full_tensors(dict(net.state_dict()))
    momentum = placement.full_tensors(momentum_buffers(model, optimizer))
    rng = _all_ranks(_rng_state(placement.device), placement.mesh.world_size)
    return {
        "format": FORMAT,
        "spec": dataclasses.asdict(placement.spec),
        "model": {k: v.cpu() for k, v in tensors.items()},
        "momentum": {k: v.cpu() for k, v in momentum.items()},
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "position": dict(position),
        "stats": dict(stats),
        "config": config,
        "placement": {"split_mode": placement.split_mode, "world_size": placement.mesh.world_size,
                      "replicas": placement.mesh.replicas, "towers": placement.spec.towers},
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(state: dict, output_dir: str, step: int, keep: int) -> Path:
    directory = checkpoint_dir(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:09d}.pt"
    tmp = directory / (final.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink()
    return final


def save(placement, model, optimizer, schedule, scaler, position, stats, config, output_dir, keep) -> Optional[Path]:
    state = build_state(placement, model, optimizer, schedule, scaler, position, stats, config)
    path = write_atomic(state, output_dir, position["step"], keep) if placement.is_main else None
    placement.barrier()
    return path


def read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, not a torch file, unpickling error ...
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"checkpoint '{path}' is not a distalex checkpoint (format {FORMAT})")
    return state


def check_architecture(state: dict, spec, path) -> None:
    saved = state["spec"]
    here = dataclasses.asdict(spec)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {here[k]!r}"
             for k in ARCH_FIELDS if saved.get(k) != here[k]]
    if diffs:
        raise CheckpointError(f"checkpoint '{path}' is for a different network ({'; '.join(diffs)})")


def restore(state: dict, placement, model, optimizer, schedule, scaler) -> bool:
    """Load into this placement (resharding as needed).  Returns True when every
    rank's RNG state was restored (same placement), False otherwise."""
    net = unwrap(model)
    net.load_state_dict(placement.local_tensors(state["model"]))
    local_momentum = placement.local_tensors(state["momentum"])
    params = dict(net.named_parameters())
    for name, buf in local_momentum.items():
        optimizer.state[params[name]]["momentum_buffer"] = buf.to(params[name].device).clone()
    schedule.load_state_dict(state["schedule"])
    schedule.apply(optimizer)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    same = (state["placement"]["world_size"] == placement.mesh.world_size
            and state["placement"]["split_mode"] == placement.split_mode)
    if same:
        _set_rng_state(state["rng"][placement.rank], placement.device)
    return same


def load_reference(path: str) -> nn.Module:
    """The plain reference model from any placement's checkpoint."""
    from distalex.model import AlexNet, AlexNetSpec
    state = read(Path(path))
    model = AlexNet(AlexNetSpec(**state["spec"]))
    model.load_state_dict(state["model"])
    return model
