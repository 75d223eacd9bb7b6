"""Checkpoints: portable between placements, written atomically, pruned to the last K.

A checkpoint holds the *reference model's* tensors (towers gathered back into
the full layers), the optimizer's per-parameter state keyed by reference
parameter name, the LR schedule, mixed-precision scaler, every rank's RNG
state, the data position (epoch, next batch), the meter and totals, and the
config.  So it loads into any placement and into the plain reference model
(docs/design.md, "Checkpoints").

Writing: rank 0 writes the file with :func:`distalex.io.atomic_write`.  A crash
at any moment leaves either the old set of files or the new complete one -
never a half file under a final name.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distalex.errors import CheckpointError
from distalex.io import atomic_write
from distalex.state import Position, Totals, TrainingState

FORMAT = 1
NAME = re.compile(r"^step_(\d{9})\.pt$")
# Spec fields that change the parameters' shapes or meaning; dropout does not.
ARCH_FIELDS = ("in_channels", "num_classes", "width", "towers", "lrn", "conv1_padding", "image_size")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str):
    d = checkpoint_dir(output_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if NAME.match(p.name))


def resolve(resume: str | None, output_dir: str) -> Path | None:
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


def momentum_buffers(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    buffers = {}
    for name, p in unwrap(model).named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            buffers[name] = buf
    return buffers


def build_state(placement, state: TrainingState, config: dict) -> dict:
    """Collective: every rank calls it; the returned dict is complete on rank 0."""
    tensors = placement.full_tensors(dict(state.model.state_dict()))
    momentum = placement.full_tensors(momentum_buffers(state.model, state.optimizer))
    rng = _all_ranks(_rng_state(placement.device), placement.mesh.world_size)
    totals = dataclasses.asdict(state.totals)
    return {
        "format": FORMAT,
        "spec": dataclasses.asdict(placement.spec),
        "model": {k: v.cpu() for k, v in tensors.items()},
        "momentum": {k: v.cpu() for k, v in momentum.items()},
        "schedule": state.schedule.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": rng,
        "position": dataclasses.asdict(state.position),
        "stats": {"meter": state.meter.state_dict(), "totals": totals},
        "config": config,
        "placement": {
            "split_mode": placement.split_mode,
            "world_size": placement.mesh.world_size,
            "replicas": placement.mesh.replicas,
            "towers": placement.spec.towers,
        },
    }


def write(saved: dict, output_dir: str, step: int, keep: int) -> Path:
    """Write one checkpoint atomically and prune to the newest ``keep``."""
    directory = checkpoint_dir(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    final = atomic_write(directory / f"step_{step:09d}.pt", lambda fh: torch.save(saved, fh))
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink()
    return final


def save(placement, state: TrainingState, config: dict, output_dir: str, keep: int) -> Path | None:
    """Collective: gather the state on rank 0, which writes it; every rank returns after the write."""
    saved = build_state(placement, state, config)
    path = write(saved, output_dir, state.position.step, keep) if placement.is_main else None
    placement.barrier()
    return path


def read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, not a torch file, unpickling error ...
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"checkpoint '{path}' is not a distalex checkpoint (format {FORMAT})")
    return state


def check_architecture(state: dict, spec, path) -> None:
    saved = state["spec"]
    here = dataclasses.asdict(spec)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {here[k]!r}" for k in ARCH_FIELDS if saved.get(k) != here[k]]
    if diffs:
        raise CheckpointError(f"checkpoint '{path}' is for a different network ({'; '.join(diffs)})")


def restore(saved: dict, placement, state: TrainingState) -> bool:
    """Load a checkpoint into this placement's state (resharding as needed).  Returns
    True when every rank's RNG state was restored (same placement), False otherwise."""
    state.model.load_state_dict(placement.local_tensors(saved["model"]))
    params = dict(state.model.named_parameters())
    for name, buf in placement.local_tensors(saved["momentum"]).items():
        state.optimizer.state[params[name]]["momentum_buffer"] = buf.to(params[name].device).clone()
    state.schedule.load_state_dict(saved["schedule"])
    state.schedule.apply(state.optimizer)
    if state.scaler is not None and saved.get("scaler") is not None:
        state.scaler.load_state_dict(saved["scaler"])
    state.position = Position(**saved["position"])
    state.totals = Totals(**saved["stats"]["totals"])
    state.meter.load_state_dict(saved["stats"]["meter"])
    same = (
        saved["placement"]["world_size"] == placement.mesh.world_size
        and saved["placement"]["split_mode"] == placement.split_mode
    )
    if same:
        _set_rng_state(saved["rng"][placement.rank], placement.device)
    return same


def load_reference(path: str) -> nn.Module:
    """The plain reference model from any placement's checkpoint."""
    from distalex.model import AlexNet, AlexNetSpec

    state = read(Path(path))
    model = AlexNet(AlexNetSpec(**state["spec"]))
    model.load_state_dict(state["model"])
    return model
