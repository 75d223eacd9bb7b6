"""Checkpoints: portable between placements, written atomically, pruned to the
last K, and loaded without ever running code from the file.

A checkpoint holds the *reference model's* tensors (towers gathered back into
the full layers), the optimizer's per-parameter state keyed by reference
parameter name, the LR schedule, mixed-precision scaler, every rank's RNG
state, the data position (epoch, next batch), the meter and totals, the last
evaluation row and the config.  So it loads into any placement and into the
plain reference model (docs/design.md, "Checkpoints").

Format: one safetensors file, ``checkpoints/step_<9 digits>.safetensors``.
The tensors are its tensors (``model/<name>``, ``momentum/<name>``,
``rng/<rank>/<kind>``); everything else is one JSON document in its metadata
(key ``distalex``).  Neither safetensors nor JSON can execute code, and every
field read back is checked against one schema (:mod:`distalex.training.metadata`) before
use, so a crafted file is refused with one line naming the field (exit 2).  The pickle-based ``step_*.pt`` files of earlier versions are
not loaded at all: unpickling can run code (the refusal says so).

Writing: rank 0 writes the file with :func:`distalex.runtime.io.atomic_write`.  A crash
at any moment leaves either the old set of files or the new complete one -
never a half file under a final name.

What counts as a checkpoint (:func:`scan`, used by pruning, ``resume=auto`` and every
message): a regular file (not followed if it is a link) named ``step_<9 digits>.safetensors``
whose safetensors header (read alone, bounded) is complete, holds distalex metadata of this
format, and stores the step its name says.  Anything else with a checkpoint's name -- junk,
a directory, a link, a FIFO, a file of another step -- is never deleted nor loaded by
``resume=auto``; it is named in one warning line (once per run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distalex.config import STEP_KEYS
from distalex.errors import CheckpointError, RunFailure, WriteError
from distalex.runtime.hostmem import memory_limit
from distalex.runtime.io import (
    atomic_write,
    ensure_dir,
    not_a_regular_file,
    open_for_reading,
    open_regular_for_reading,
    reopen_path,
)
from distalex.training import metadata
from distalex.training.state import Position, Totals, TrainingState

FORMAT = 2
SUFFIX = ".safetensors"
NAME = re.compile(r"^step_(\d{9})\.safetensors$")
LEGACY_NAME = re.compile(r"^step_(\d{9})\.pt$")
META_KEY = "distalex"
# stats.meter: rank 0's epoch figures (all earlier versions read); stats.meters: every rank's.
LEGACY_METER = ("loss_sum", "correct", "seen", "train_time")
RANK_METER = (*LEGACY_METER, "interval_loss", "interval_steps", "exchange_bytes", "replica")
HEADER_LIMIT = 16 << 20  # bytes of safetensors header read to recognise a checkpoint (a real one: a few KB)
TENSOR_GROUPS = ("model", "momentum")
# Spec fields that change the parameters' shapes or meaning; dropout does not.
ARCH_FIELDS = ("in_channels", "num_classes", "width", "towers", "lrn", "conv1_padding", "image_size")
_PICKLE_HINT = (
    "; it is a pickle (.pt) file, which distalex does not load because unpickling can run code in it "
    "(checkpoints are .safetensors files now)"
)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def header_step(path: Path) -> int:
    """The step a checkpoint file stores, from its safetensors header and distalex metadata
    alone (at most :data:`HEADER_LIMIT` bytes read; no tensor is loaded).  ValueError saying
    why when ``path`` is not a complete regular distalex checkpoint file (links not followed)."""
    try:
        with open_regular_for_reading(path) as fh:
            size = struct.unpack("<Q", fh.read(8).ljust(8, b"\0"))[0]
            if not 2 <= size <= HEADER_LIMIT:
                raise ValueError("no safetensors header")
            raw = fh.read(size)
            total = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    try:
        header = json.loads(raw)
        info = json.loads(header["__metadata__"][META_KEY])
        step = info["position"]["step"]
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        raise ValueError("its header is not that of a distalex checkpoint") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or type(step) is not int:
        raise ValueError("its header is not that of a distalex checkpoint")
    if total != 8 + size + max(ends, default=0):
        raise ValueError(
            f"it is truncated or padded ({total} bytes, its header says {8 + size + max(ends, default=0)})"
        )
    return step


def scan(output_dir: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(checkpoints, by step; entries with a checkpoint's name that are none, with why)."""
    d = checkpoint_dir(output_dir)
    if not d.is_dir() or d.is_symlink():
        return [], []
    good, bad = [], []
    for p in sorted(d.iterdir()):
        m = NAME.match(p.name)
        if not m:
            continue
        kind = not_a_regular_file(p)
        if kind is not None:
            bad.append((p, f"it is {kind}"))
            continue
        try:
            step = header_step(p)
        except ValueError as exc:
            bad.append((p, str(exc)))
            continue
        if step != int(m.group(1)):
            bad.append((p, f"it stores step {step}, not the step its name says"))
            continue
        good.append(p)
    return good, bad


def list_checkpoints(output_dir: str):
    """The output dir's checkpoints, oldest first (see :func:`scan`: never anything else)."""
    return scan(output_dir)[0]


_WARNED: set = set()  # foreign files already named in a warning, once per run (process)


def _warn_foreign(bad, warn) -> None:
    for p, why in bad:
        if str(p) not in _WARNED:
            _WARNED.add(str(p))
            warn(f"warning: '{p}' is not a distalex checkpoint ({why}); left alone, never pruned nor resumed from")


def kept(output_dir: str) -> str:
    """What a failed run leaves to continue from, in one sentence."""
    found = list_checkpoints(output_dir)
    if found:
        return f"The newest checkpoint, {found[-1]}, is kept."
    return f"No checkpoint was written yet (nothing in {checkpoint_dir(output_dir)} to resume from)."


def _legacy_checkpoints(output_dir: str):
    d = checkpoint_dir(output_dir)
    return sorted(p for p in d.iterdir() if LEGACY_NAME.match(p.name)) if d.is_dir() else []


def resolve(resume: str | None, output_dir: str, warn=print) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its contents (read and checked), or (None, None).

    ``train.resume=PATH``: that file, or exit 2.  ``train.resume=auto``: the newest
    *readable* checkpoint of the output dir; an unreadable newer one is skipped
    with a one-line ``warn`` naming it (it is left where it is)."""
    if resume is None:
        return None, None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            raise CheckpointError(
                f"train.resume: '{resume}' is a directory, not a checkpoint file; pass a file from its "
                f"checkpoints/ folder, or train.resume=auto with train.output_dir set to that run's folder"
            )
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(f"train.resume: checkpoint '{resume}' does not exist")
        return path, read(path)  # a FIFO, a device, a dangling link: refused there, naming what it is
    found, foreign = scan(output_dir)
    if not found and foreign:
        raise CheckpointError(
            f"train.resume=auto: none of the {len(foreign)} checkpoints in {checkpoint_dir(output_dir)} can be "
            f"read (newest: '{foreign[-1][0]}': {foreign[-1][1]})"
        )
    if not found:
        legacy = _legacy_checkpoints(output_dir)
        if legacy:
            raise CheckpointError(
                f"train.resume=auto: {checkpoint_dir(output_dir)} holds only pickle checkpoints "
                f"({legacy[-1].name}, ...) of an earlier distalex, which are not loaded because unpickling "
                f"can run code; start afresh with train.overwrite=true"
            )
        return None, None
    skipped = [
        CheckpointError(f"checkpoint '{p}' cannot be used ({why})")
        for p, why in foreign
        if int(NAME.match(p.name).group(1)) > int(NAME.match(found[-1].name).group(1))
    ]  # the older ones are named by pruning's warning
    _WARNED.update(str(p) for p, _ in foreign if any(str(p) in str(e) for e in skipped))  # named once per run
    for path in reversed(found):
        try:
            saved = read(path)
        except CheckpointError as exc:
            skipped.append(exc)
            continue
        for exc in skipped:
            warn(f"warning: {exc}; skipped (left in place), resuming from {path.name}")
        return path, saved
    raise CheckpointError(
        f"train.resume=auto: none of the {len(found) + len(foreign)} checkpoints in {checkpoint_dir(output_dir)} can be "
        f"read (newest: {skipped[0]})"
    )


# -- building the state to save --------------------------------------------------------
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


def rank_meter(placement, state: TrainingState) -> dict:
    """This rank's running figures as a checkpoint stores them (``stats.meters[rank]``): the
    meter's unreduced sums, the exchange bytes counted since the last step row (so that row's
    bytes per step cover the same steps as its loss), and the replica they belong to."""
    return {
        **state.meter.state_dict(),
        "exchange_bytes": placement.exchange_stats.bytes_sent,
        "replica": placement.replica,
    }


def momentum_buffers(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    buffers = {}
    for name, p in unwrap(model).named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            buffers[name] = buf
    return buffers


def build_state(placement, state: TrainingState, config: dict, last_eval: dict | None = None, classes=None) -> dict:
    """Collective: every rank calls it; the returned dict is complete on rank 0.

    ``last_eval``: the newest evaluation row (the finished epoch's figures), so a
    run resumed after its last step reports what the uninterrupted run would.
    ``classes``: the data's class names in label order (what predictions are called)."""
    tensors = placement.full_tensors(dict(state.model.state_dict()))
    momentum = placement.full_tensors(momentum_buffers(state.model, state.optimizer))
    # Every rank's RNG streams and running figures, gathered unreduced (one collective).
    ranks = _all_ranks(
        {"rng": _rng_state(placement.device), "meter": rank_meter(placement, state)}, placement.mesh.world_size
    )
    rng = [r["rng"] for r in ranks]
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
        "stats": {
            # rank 0's epoch figures, as earlier versions wrote and read them
            "meter": {k: ranks[0]["meter"][k] for k in LEGACY_METER},
            "meters": [r["meter"] for r in ranks],  # every rank's, by rank (restored per rank)
            "totals": totals,
        },
        "last_eval": dict(last_eval or {}),
        "classes": list(classes) if classes is not None else None,
        "config": config,
        "placement": {
            "split_mode": placement.split_mode,
            "world_size": placement.mesh.world_size,
            "replicas": placement.mesh.replicas,
            "towers": placement.spec.towers,
        },
    }


# -- the file format -------------------------------------------------------------------
def encode(saved: dict) -> bytes:
    """A state dict (as :func:`build_state` returns it) as the bytes of a safetensors file."""
    from safetensors.torch import save

    tensors = {}
    for group in TENSOR_GROUPS:
        for name, t in saved[group].items():
            tensors[f"{group}/{name}"] = t.detach().cpu().contiguous()
    for rank, states in enumerate(saved["rng"]):
        for kind, t in states.items():
            tensors[f"rng/{rank}/{kind}"] = t.detach().cpu().contiguous()
    info = {k: v for k, v in saved.items() if k not in (*TENSOR_GROUPS, "rng")}
    info["rng_ranks"] = len(saved["rng"])
    return save(tensors, metadata={META_KEY: json.dumps(info, sort_keys=True)})


def _refuse(path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint '{path}' is not a distalex checkpoint ({why})")


def decode(meta: dict | None, tensors: dict[str, torch.Tensor], path) -> dict:
    """The state dict of a checkpoint from its metadata and tensors; every field checked."""
    if not meta or META_KEY not in meta:
        raise _refuse(path, "no distalex metadata")
    try:
        info = json.loads(meta[META_KEY])
    except (ValueError, RecursionError):
        raise _refuse(path, "its metadata is not JSON") from None
    if not isinstance(info, dict):
        raise _refuse(path, "its metadata is not a JSON object")
    if info.get("format") != FORMAT:
        raise _refuse(path, f"format {metadata.show(info.get('format'))}, expected {FORMAT}")
    metadata.check(info, path)  # every field: type, range, presence (distalex/training/metadata.py)
    last_eval = info.get("last_eval", {})
    groups: dict[str, dict] = {g: {} for g in TENSOR_GROUPS}
    rng: list[dict] = [{} for _ in range(max(0, min(info["rng_ranks"], 1 << 16)))]
    for key, t in tensors.items():
        head, _, rest = key.partition("/")
        if head in groups and rest:
            groups[head][rest] = t
        elif head == "rng" and rest.count("/") == 1 and rest.split("/")[0].isdigit():
            rank, kind = rest.split("/")
            if int(rank) >= len(rng):
                raise _refuse(path, f"tensor '{key}' names rank {rank} of {len(rng)}")
            rng[int(rank)][kind] = t
        else:
            raise _refuse(path, f"unexpected tensor '{key}'")
    if not groups["model"]:
        raise _refuse(path, "no model tensors")
    if any("cpu" not in r or r["cpu"].dtype != torch.uint8 for r in rng):
        raise _refuse(path, "an RNG state is missing or malformed")
    return {**info, **groups, "rng": rng, "last_eval": last_eval}


def class_names(saved: dict) -> tuple[str, ...] | None:
    """The class names a checkpoint carries, in label order; None for older checkpoints."""
    classes = saved.get("classes")
    return tuple(classes) if classes is not None else None


def write(saved: dict, output_dir: str, step: int, keep: int, warn=print) -> Path:
    """Write one checkpoint atomically and prune to the newest ``keep``.  A failed write
    (a full disk, say) removes its temporary file, prunes nothing and raises a one-line
    :class:`WriteError` (exit 1).

    Pruning deletes only checkpoints (:func:`scan`), never the one just written: ``keep``
    of them remain, the new one among them.  Anything else with a checkpoint's name is left
    alone and named in one ``warn`` line (once per run)."""
    if saved.get("position", {}).get("step") != step:
        # A file whose name and stored step disagree is not a checkpoint (scan): never write one.
        raise ValueError(f"checkpoint of step {saved.get('position', {}).get('step')} written as step {step}")
    directory = checkpoint_dir(output_dir)
    data = encode(saved)
    try:
        ensure_dir(directory)
        final = atomic_write(directory / f"step_{step:09d}{SUFFIX}", data)
    except WriteError as exc:
        raise WriteError(
            f"{exc}; the run stopped at step {step}. {kept(output_dir)} Free space, then train.resume=auto continues."
        ) from None
    found, foreign = scan(output_dir)
    _warn_foreign(foreign, warn)
    others = [p for p in found if p.name != final.name]
    for old in others[: max(0, len(others) - (max(keep, 1) - 1))]:
        try:
            old.unlink()
        except FileNotFoundError:
            pass
    return final


def save(
    placement, state: TrainingState, config: dict, output_dir: str, keep: int, last_eval=None, classes=None
) -> Path | None:
    """Collective: gather the state on rank 0, which writes it; every rank returns after the
    write, or raises when it failed (so no rank waits for a write that will never come)."""
    saved = build_state(placement, state, config, last_eval, classes)
    path, failure = None, None
    if placement.is_main:
        try:
            path = write(saved, output_dir, state.position.step, keep)
        except RunFailure as exc:
            failure = exc
    if placement.any_rank(failure is not None):
        raise failure or RunFailure("the checkpoint write failed on the main process")
    return path


def read(path) -> dict:
    """A checkpoint's contents; a file that is not a readable distalex checkpoint: one-line
    :class:`CheckpointError` (exit 2).  Nothing in the file is executed.

    The file is opened by :func:`distalex.runtime.io.open_for_reading` (a FIFO, a device or a
    directory is refused at once, never read) and safetensors reads that very file through
    :func:`~distalex.runtime.io.reopen_path`.  Its tensors are loaded into memory, so a file
    larger than the machine's memory (:func:`~distalex.runtime.hostmem.memory_limit`) is
    refused from its size."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a directory, not a checkpoint file")
    with open_for_reading(path, what="checkpoint", max_bytes=memory_limit(), error=CheckpointError) as checked:
        try:
            with safe_open(reopen_path(checked), framework="pt", device="cpu") as fh:
                meta = fh.metadata()
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # truncated, not safetensors, a pickle, unreadable ...
            raise CheckpointError(
                f"checkpoint '{path}' cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'}){_pickle_hint(checked)}"
            ) from None
    return decode(meta, tensors, path)


def _pickle_hint(fh) -> str:
    try:
        fh.seek(0)
        head = fh.read(4)
    except OSError:
        return ""
    pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    return _PICKLE_HINT if pickled or head == b"PK\x03\x04" else ""


# -- checks and restore ----------------------------------------------------------------
def check_architecture(state: dict, spec, path) -> None:
    saved = state["spec"]
    here = dataclasses.asdict(spec)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {here[k]!r}" for k in ARCH_FIELDS if saved.get(k) != here[k]]
    if diffs:
        raise CheckpointError(f"checkpoint '{path}' is for a different network ({'; '.join(diffs)})")


def _lookup(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_same_steps(state: dict, config: dict, allowed, path) -> None:
    """Refuse a resume whose config changes what a step is (the batch, the data, the seed):
    the saved data position would then point at other examples.  ``allowed``: keys the user
    says may change (``train.resume_allow_changes``)."""
    saved = state["config"]
    diffs = [
        f"{k}={_lookup(saved, k)!r} in the checkpoint, {_lookup(config, k)!r} now"
        for k in STEP_KEYS
        if k not in allowed and _lookup(saved, k) != _lookup(config, k)
    ]
    if diffs:
        keys = ",".join(d.split("=")[0] for d in diffs)
        raise CheckpointError(
            f"train.resume: checkpoint '{path}' was trained with other data or batches ({'; '.join(diffs)}); "
            f"resume with the same values, or pass train.resume_allow_changes=[{keys}] if the change is intended"
        )


def restore(saved: dict, placement, state: TrainingState) -> bool:
    """Load a checkpoint into this placement's state (resharding as needed).  Returns
    True when every rank's RNG state was restored (same placement), False otherwise.
    A checkpoint whose contents do not fit this run: :class:`CheckpointError`."""
    try:
        return _restore(saved, placement, state)
    except CheckpointError:
        raise
    except Exception as exc:  # shapes, names or values that do not fit
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint does not fit this run ({type(exc).__name__}: {msg})") from None


def _restore(saved: dict, placement, state: TrainingState) -> bool:
    state.model.load_state_dict(placement.local_tensors(saved["model"]))
    params = dict(state.model.named_parameters())
    for name, buf in placement.local_tensors(saved["momentum"]).items():
        if name not in params or buf.shape != params[name].shape:
            raise CheckpointError(f"checkpoint momentum '{name}' does not fit the model")
        state.optimizer.state[params[name]]["momentum_buffer"] = buf.to(params[name].device).clone()
    state.schedule.load_state_dict(saved["schedule"])
    state.schedule.apply(state.optimizer)
    if state.scaler is not None and saved.get("scaler") is not None:
        state.scaler.load_state_dict(saved["scaler"])
    state.position = Position(**saved["position"])
    state.totals = Totals(**saved["stats"]["totals"])
    same = (
        saved["placement"].get("world_size") == placement.mesh.world_size
        and saved["placement"].get("split_mode") == placement.split_mode
        and len(saved["rng"]) == placement.mesh.world_size
    )
    meter, exchange_bytes = meter_for_rank(saved, placement, same)
    state.meter.load_state_dict(meter)
    placement.exchange_stats.bytes_sent = exchange_bytes
    if same:
        _set_rng_state(saved["rng"][placement.rank], placement.device)
    return same


def meter_for_rank(saved: dict, placement, same: bool) -> tuple[dict, int]:
    """This rank's running figures from a checkpoint, and its exchange bytes since the last row.

    * Written by this placement (same split mode, world size and replicas): rank r gets
      exactly what rank r saved, so the resumed rows are the uninterrupted run's to the bit.
    * Written by another placement: the epoch's sums of the saved replicas are added into
      this run's replicas (saved replica i into replica i mod R), so the epoch row covers
      every example the epoch has seen; the interval since the last step row starts afresh
      (its exchange bytes were counted by the other placement's exchanges).
    * Written before every rank's figures were saved: rank 0's, on every rank (as then)."""
    meters = saved["stats"].get("meters")
    if meters is None:
        return saved["stats"]["meter"], 0
    if same and saved["placement"].get("replicas") == placement.mesh.replicas:
        mine = meters[placement.rank]
        return {k: mine[k] for k in RANK_METER if k not in ("exchange_bytes", "replica")}, mine["exchange_bytes"]
    first_of_replica: dict[int, dict] = {}
    for m in meters:  # the ranks of one replica (its towers or stages) hold the same figures
        first_of_replica.setdefault(m["replica"], m)
    mine = [m for i, m in sorted(first_of_replica.items()) if i % placement.mesh.replicas == placement.replica]
    sums = {k: sum((m[k] for m in mine), 0.0) for k in ("loss_sum", "correct", "seen")}
    return {**sums, "train_time": meters[0]["train_time"]}, 0


def load_reference(path: str) -> nn.Module:
    """The plain reference model from any placement's checkpoint.  The network is first
    built without memory and compared with the file's tensors, so a crafted spec cannot
    make it allocate more than the file holds."""
    return reference_from_state(read(Path(path)), path)


def reference_from_state(state: dict, path) -> nn.Module:
    """The plain reference model from a checkpoint's contents (as :func:`read` returns them)."""
    from distalex.model.alexnet import AlexNet, AlexNetSpec

    try:
        spec = AlexNetSpec(**state["spec"])
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in AlexNet(spec).state_dict().items()}
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{path}' holds an unusable network spec ({type(exc).__name__})") from None
    if shapes != {k: tuple(v.shape) for k, v in state["model"].items()}:
        raise CheckpointError(f"checkpoint '{path}': its tensors do not match its network spec")
    model = AlexNet(spec)
    model.load_state_dict(state["model"])
    return model
