"""The one schema of a checkpoint's metadata: every field's type, range and presence.

A checkpoint's non-tensor contents are one JSON document (:mod:`distalex.training.checkpoint`).
:func:`check` validates the whole document against :data:`SCHEMA` before anything uses a
field of it, so every reader (a resume, ``resume=auto``'s fall-back, evaluate, predict,
export, ``distalex.read_checkpoint``) refuses the same bad files with the same line, and a
resume refuses one before it touches the run dir.  A bad field is one
:class:`~distalex.errors.CheckpointError` (exit 2) naming the file, the field's path and
what it holds::

    checkpoint 'run/checkpoints/step_000000012.safetensors' metadata: last_eval.step must be
    an int in [0, 9223372036854775807], got '5'

Keys are known at every level but ``config`` (a config is validated as one where it is used:
``check_same_steps`` compares its step keys, the serving commands load it with
:func:`distalex.config.load_config`).  Integers are bounded by int64 (they end up in tensors
and file names); floats must be finite, except the plateau schedule's ``best``, which starts
at +inf.  The tables below are kept equal to the dataclasses they are restored into
(``Position``, ``Totals``, ``AlexNetSpec``, ``LRSchedule``) by tests/unit/test_checkpoint_metadata.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from distalex.config import SPLIT_MODES
from distalex.errors import CheckpointError

INT64_MAX = 2**63 - 1
MAX_RANKS = 1 << 16  # RNG states of at most this many processes
MAX_CLASSES = 1 << 20
MAX_NAME = 4096  # characters of one class name

Check = Callable[[object, str], None]


class MetadataError(CheckpointError):
    """One field of a checkpoint's metadata is missing, unknown, mistyped or out of range (exit 2)."""


class _Bad(Exception):
    """A field that fails the schema: where it is, what it must be, what it holds."""

    def __init__(self, where: str, expected: str, value=None, shown: str | None = None):
        super().__init__(where)
        self.where, self.expected = where, expected
        self.shown = shown if shown is not None else show(value)


def show(value) -> str:
    """A field's value in at most ~60 ASCII characters on one line (never recursing into
    a nested structure, which may be deep: JSON allows it)."""
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- field checks: each takes (value, where) and raises _Bad -----------------------------
def integer(lo: int = 0, hi: int = INT64_MAX) -> Check:
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _Bad(where, f"an int in [{lo}, {hi}]", value)

    return check


def number(lo: float | None = 0.0, hi: float | None = None, inf_ok: bool = False) -> Check:
    """A JSON number (int or float; not a bool), finite unless ``inf_ok`` (+inf only), in [lo, hi]."""
    bounds = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
    what = ("a number (or +inf)" if inf_ok else "a finite number") + bounds

    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(where, what, value)
        if isinstance(value, int):  # compared exactly: float() of a huge int overflows
            ok = (lo is None or value >= lo) and (hi is None or value <= hi) and abs(value) <= INT64_MAX
        elif math.isnan(value) or (math.isinf(value) and not (inf_ok and value > 0)):
            ok = False
        else:
            ok = (lo is None or value >= lo) and (hi is None or value <= hi or math.isinf(value))
        if not ok:
            raise _Bad(where, what, value)

    return check


def one_of(*choices) -> Check:
    def check(value, where):
        if not isinstance(value, str) or value not in choices:
            raise _Bad(where, f"one of {', '.join(choices)}", value)

    return check


def boolean(value, where) -> None:
    if not isinstance(value, bool):
        raise _Bad(where, "true or false", value)


def any_object(value, where) -> None:
    if not isinstance(value, dict):
        raise _Bad(where, "an object", value)


def nullable(check: Check) -> Check:
    def inner(value, where):
        if value is not None:
            check(value, where)

    return inner


def names(value, where) -> None:
    """Class names: a list of non-empty strings."""
    if not isinstance(value, list) or len(value) > MAX_CLASSES:
        raise _Bad(where, f"a list of at most {MAX_CLASSES} names", value)
    for i, name in enumerate(value):
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise _Bad(f"{where}[{i}]", f"a non-empty string of at most {MAX_NAME} characters", name)


REQUIRED, OPTIONAL = True, False


def obj(fields: dict[str, tuple[Check, bool]], rule: Callable[[dict, str], None] | None = None) -> Check:
    """An object with exactly these keys (required ones present, no unknown one), each
    checked; then ``rule`` over the whole object (relations between its fields)."""

    def check(value, where):
        if not isinstance(value, dict):
            raise _Bad(where, "an object", value)
        for key in value:
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise _Bad(_join(where, key), f"absent (unknown key; known: {known})", shown="a value")
        for key, (field_check, required) in fields.items():
            if key in value:
                field_check(value[key], _join(where, key))
            elif required:
                raise _Bad(_join(where, key), "present", shown="nothing (missing)")
        if rule is not None:
            rule(value, where)

    check.fields = fields  # type: ignore[attr-defined]  # the table, for the tests that keep it equal to the code
    return check


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# -- the schema --------------------------------------------------------------------------
def _finite(lo=0.0, hi=None):
    return number(lo, hi)


def _last_eval_needs_step(value: dict, where: str) -> None:
    # An evaluation row is found by its step (the loop's "evaluated yet?" test, the records'
    # trim on resume); an empty object means no evaluation yet.
    if value and "step" not in value:
        raise _Bad(_join(where, "step"), "present (the row is not empty)", shown="nothing (missing)")


SPEC = obj(
    {
        "in_channels": (integer(1, 4096), REQUIRED),
        "num_classes": (integer(1, MAX_CLASSES), REQUIRED),
        "image_size": (integer(1, 1 << 20), REQUIRED),
        "width": (number(0.0, 1e6), REQUIRED),
        "towers": (integer(1, MAX_RANKS), REQUIRED),
        "dropout": (number(0.0, 1.0), OPTIONAL),
        "dropout_rng": (one_of("placement_invariant", "process"), OPTIONAL),
        "lrn": (boolean, REQUIRED),
        "conv1_padding": (integer(0, 1 << 20), REQUIRED),
    }
)
SCHEDULE = obj(
    {  # progress (restored) ...
        "lr": (_finite(), REQUIRED),
        "best": (number(0.0, inf_ok=True), REQUIRED),
        "bad_epochs": (integer(), REQUIRED),
        "reductions": (integer(), REQUIRED),
        # ... and the settings (those of the resumed run's config are used)
        "kind": (one_of("constant", "plateau"), OPTIONAL),
        "factor": (_finite(), OPTIONAL),
        "patience": (integer(), OPTIONAL),
        "min_lr": (_finite(), OPTIONAL),
    }
)
SCALER = nullable(  # torch.amp.GradScaler.state_dict(): {} when disabled
    obj(
        {
            "scale": (_finite(), OPTIONAL),
            "growth_factor": (_finite(), OPTIONAL),
            "backoff_factor": (_finite(), OPTIONAL),
            "growth_interval": (integer(), OPTIONAL),
            "_growth_tracker": (integer(), OPTIONAL),
        }
    )
)
POSITION = obj({"epoch": (integer(), REQUIRED), "batch": (integer(), REQUIRED), "step": (integer(), REQUIRED)})
# The training meter's running sums of the epoch so far (TrainMeter.state_dict()).
METER = obj({k: (_finite(), REQUIRED) for k in ("loss_sum", "correct", "seen", "train_time")})
TOTALS = obj({k: (_finite(), REQUIRED) for k in ("train_examples", "train_time", "wall_time")})
# Every rank's running figures, unreduced (absent in checkpoints written before they were
# recorded): the epoch's sums, the sums since the last step row, the exchange bytes since
# that row, and the replica the rank belongs to.
RANK_METER = obj(
    {
        **{k: (_finite(), REQUIRED) for k in ("loss_sum", "correct", "seen", "train_time")},
        **{k: (_finite(), REQUIRED) for k in ("interval_loss", "interval_steps")},
        **{k: (integer(), REQUIRED) for k in ("exchange_bytes", "replica")},
    }
)


def list_of(item: Check, most: int) -> Check:
    def check(value, where):
        if not isinstance(value, list) or len(value) > most:
            raise _Bad(where, f"a list of at most {most} entries", value)
        for i, entry in enumerate(value):
            item(entry, f"{where}[{i}]")

    return check


STATS = obj(
    {"meter": (METER, REQUIRED), "meters": (list_of(RANK_METER, MAX_RANKS), OPTIONAL), "totals": (TOTALS, REQUIRED)}
)
# The newest evaluation row (Trainer.end_epoch), carried so a resumed run's records continue.
LAST_EVAL = obj(
    {
        "step": (integer(), OPTIONAL),
        "epoch": (_finite(), OPTIONAL),
        "loss": (_finite(), OPTIONAL),
        "train_acc": (_finite(0.0, 1.0), OPTIONAL),
        "test_acc": (_finite(0.0, 1.0), OPTIONAL),
        "test_top5": (_finite(0.0, 1.0), OPTIONAL),
        "examples_per_sec": (_finite(), OPTIONAL),
        "tflops_per_sec": (_finite(), OPTIONAL),
        "mfu": (_finite(), OPTIONAL),
        "epoch_time_s": (_finite(), OPTIONAL),
        "lr": (_finite(), OPTIONAL),
    },
    rule=_last_eval_needs_step,
)
PLACEMENT = obj(
    {
        "split_mode": (one_of(*SPLIT_MODES), REQUIRED),
        "world_size": (integer(1, MAX_RANKS), REQUIRED),
        "replicas": (integer(1, MAX_RANKS), REQUIRED),
        "towers": (integer(1, MAX_RANKS), REQUIRED),
    }
)


def _whole(info: dict, where: str) -> None:
    """Relations between fields."""
    classes, n = info.get("classes"), info["spec"]["num_classes"]
    if classes is not None and len(classes) != n:
        raise _Bad("classes", f"one name per class of the network (spec.num_classes = {n})", classes)
    meters, placement = info["stats"].get("meters"), info["placement"]
    if meters is not None:
        if len(meters) != placement["world_size"] or len(meters) != info["rng_ranks"]:
            raise _Bad("stats.meters", f"one entry per rank (placement.world_size = {placement['world_size']})", meters)
        for rank, m in enumerate(meters):
            if m["replica"] >= placement["replicas"]:
                raise _Bad(
                    f"stats.meters[{rank}].replica", f"< placement.replicas ({placement['replicas']})", m["replica"]
                )
    step = info.get("last_eval", {}).get("step")
    if step is not None and step > info["position"]["step"]:
        raise _Bad("last_eval.step", f"at most position.step ({info['position']['step']})", step)


SCHEMA = obj(
    {
        "format": (integer(), REQUIRED),  # its value is checked first (:func:`check`)
        "spec": (SPEC, REQUIRED),
        "schedule": (SCHEDULE, REQUIRED),
        "scaler": (SCALER, OPTIONAL),
        "position": (POSITION, REQUIRED),
        "stats": (STATS, REQUIRED),
        "last_eval": (LAST_EVAL, OPTIONAL),
        "classes": (nullable(names), OPTIONAL),  # absent in checkpoints written before they were recorded
        "config": (any_object, REQUIRED),
        "placement": (PLACEMENT, REQUIRED),
        "rng_ranks": (integer(1, MAX_RANKS), REQUIRED),
    },
    rule=_whole,
)


def check(info, path) -> dict:
    """``info`` (a checkpoint's decoded metadata) if it fits :data:`SCHEMA`; else one
    :class:`MetadataError` naming ``path`` and the first field that does not."""
    try:
        SCHEMA(info, "")
    except _Bad as bad:
        raise MetadataError(
            f"checkpoint '{path}' metadata: {bad.where or 'the document'} must be {bad.expected}, got {bad.shown}"
        ) from None
    return info
