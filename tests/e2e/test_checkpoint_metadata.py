"""Checkpoint metadata: one schema (distalex/training/metadata.py) for every field, checked by
every reader before anything uses a field -- so a bad field is one line, exit 2, and a resume
refuses before it touches the run dir.  The checkpoint is a real run's; the bad ones are it
with its metadata changed, written as distalex writes checkpoints (safetensors, the JSON
document under the ``distalex`` key)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from distalex.errors import CheckpointError
from distalex.model.alexnet import AlexNetSpec
from distalex.telemetry.records import RunLog
from distalex.training import checkpoint, metadata
from distalex.training.meters import TrainMeter
from distalex.training.schedule import LRSchedule
from distalex.training.state import Position, Totals

from helpers import EVALUATE, EXPORT, TINY, assert_bad_input, latest_checkpoint, run_cli

# 64 images / batch 32: 2 steps, one epoch, so the checkpoint carries an evaluation row.
RUN = [
    "--config", TINY, "tracking.wandb=false", "tracking.plots=false", "train.progress=false",
    "data.train_limit=64", "data.test_limit=32", "train.batch_size=32", "train.epochs=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta") / "run"
    run_cli(*RUN, f"train.output_dir={out}")
    return out


def contents(path: Path):
    """(metadata document, tensors) of a checkpoint file, read without distalex."""
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        info = json.loads(fh.metadata()[checkpoint.META_KEY])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return info, tensors


def rewrite(path: Path, info=None, text: str | None = None, tensors=None) -> None:
    """The file at ``path`` with another metadata document, in distalex's writer format."""
    _, real_tensors = contents(path) if tensors is None else (None, tensors)
    body = text if text is not None else json.dumps(info, sort_keys=True)
    path.write_bytes(save(real_tensors, metadata={checkpoint.META_KEY: body}))


def changed(info: dict, dotted: str, value=None, drop: bool = False) -> dict:
    out = json.loads(json.dumps(info))
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    if drop:
        del node[last]
    else:
        node[last] = value
    return out


# -- the examples and other instances of the class -----------------------------------
CASES = [
    # (field, new value, the message's words)
    ("last_eval.step", "5", "last_eval.step must be an int in [0, 9223372036854775807], got '5'"),
    ("last_eval.test_acc", "0.5", "last_eval.test_acc must be a finite number in [0.0, 1.0], got '0.5'"),
    ("last_eval.loss", [1.0], "last_eval.loss must be a finite number >= 0.0, got a list of 1 items"),
    ("last_eval.train_acc", 1.5, "last_eval.train_acc must be a finite number in [0.0, 1.0], got 1.5"),
    ("last_eval.test_acc", float("nan"), "last_eval.test_acc must be a finite number in [0.0, 1.0], got nan"),
    ("last_eval.loss", float("inf"), "last_eval.loss must be a finite number >= 0.0, got inf"),
    ("last_eval.step", 10**6, "last_eval.step must be at most position.step (2), got 1000000"),
    ("last_eval.step", True, "last_eval.step must be an int"),
    ("last_eval.surprise", 1, "last_eval.surprise must be absent (unknown key"),
    ("last_eval", [], "last_eval must be an object, got a list of 0 items"),
    ("position.step", 2**64, "position.step must be an int in [0, 9223372036854775807], got 18446744073709551616"),
    ("position.epoch", 1.0, "position.epoch must be an int"),
    ("stats.meter.seen", "64", "stats.meter.seen must be a finite number >= 0.0, got '64'"),
    ("stats.totals.wall_time", -1.0, "stats.totals.wall_time must be a finite number >= 0.0, got -1.0"),
    ("schedule.best", float("nan"), "schedule.best must be a number (or +inf) >= 0.0, got nan"),
    ("schedule.lr", float("-inf"), "schedule.lr must be a finite number >= 0.0, got -inf"),
    ("spec.width", "0.125", "spec.width must be a finite number in [0.0, 1000000.0], got '0.125'"),
    ("spec.lrn", 0, "spec.lrn must be true or false, got 0"),
    ("classes", ["0", 1], "classes[1] must be a non-empty string"),
    ("classes", ["a"], "classes must be one name per class of the network (spec.num_classes = 10)"),
    ("placement.split_mode", "mesh", "placement.split_mode must be one of single, ddp"),
    ("rng_ranks", 0, "rng_ranks must be an int in [1, 65536], got 0"),
    ("config", "x", "config must be an object, got 'x'"),
    ("scaler", 3, "scaler must be an object, got 3"),
    ("evil", {"a": 1}, "evil must be absent (unknown key"),
]


@pytest.mark.parametrize(("field", "value", "words"), CASES, ids=[f"{c[0]}={c[1]!r}" for c in CASES])
def test_a_bad_field_is_one_line_naming_file_and_field(real_run, tmp_path, field, value, words):
    path = tmp_path / "bad.safetensors"
    shutil.copyfile(latest_checkpoint(real_run), path)
    info, _ = contents(path)
    rewrite(path, changed(info, field, value))
    with pytest.raises(CheckpointError) as caught:
        checkpoint.read(path)
    msg = str(caught.value)
    assert msg.startswith(f"checkpoint '{path}' metadata: ") and words in msg and "\n" not in msg, msg


@pytest.mark.parametrize("field", ["spec", "position", "position.batch", "stats.meter", "stats.totals.train_time",
                                   "schedule.lr", "placement.world_size", "rng_ranks", "config", "spec.num_classes"])  # fmt: skip
def test_a_missing_field_is_named(real_run, tmp_path, field):
    path = tmp_path / "bad.safetensors"
    shutil.copyfile(latest_checkpoint(real_run), path)
    rewrite(path, changed(contents(path)[0], field, drop=True))
    with pytest.raises(CheckpointError, match=rf"metadata: {field} must be present, got nothing \(missing\)$"):
        checkpoint.read(path)


def test_optional_fields_may_be_absent_and_a_real_checkpoint_passes(real_run, tmp_path):
    path = tmp_path / "ok.safetensors"
    shutil.copyfile(latest_checkpoint(real_run), path)
    info = contents(path)[0]
    assert info["last_eval"]["step"] == info["position"]["step"] == 2 and info["classes"]  # a real, complete one
    checkpoint.read(path)
    for field in ("last_eval", "classes", "scaler", "spec.dropout", "schedule.kind"):  # older checkpoints lack them
        rewrite(path, changed(info, field, drop=True))
        checkpoint.read(path)
    rewrite(path, changed(info, "last_eval", {}))  # no evaluation yet
    assert checkpoint.read(path)["last_eval"] == {}
    rewrite(path, changed(info, "last_eval", {"loss": 1.0}))  # a row needs its step
    with pytest.raises(CheckpointError, match="last_eval.step must be present"):
        checkpoint.read(path)


def test_the_schema_tables_are_the_restored_dataclasses():
    """The schema's keys are those the restore builds objects from (a new field in one of
    them must be given a type and range here)."""

    def keys(check):
        return set(check.fields)

    assert keys(metadata.POSITION) == {f.name for f in dataclasses.fields(Position)}
    assert keys(metadata.TOTALS) == {f.name for f in dataclasses.fields(Totals)}
    assert keys(metadata.SPEC) == {f.name for f in dataclasses.fields(AlexNetSpec)}
    assert keys(metadata.SCHEDULE) == {f.name for f in dataclasses.fields(LRSchedule)}
    placement = SimpleNamespace(device=torch.device("cpu"))
    rank_meter = set(TrainMeter(placement).state_dict()) | {"exchange_bytes", "replica"}
    assert keys(metadata.RANK_METER) == set(checkpoint.RANK_METER) == rank_meter
    assert keys(metadata.METER) == set(checkpoint.LEGACY_METER)  # rank 0's epoch sums, as older versions read
    required = {k for k, (_, req) in metadata.SCHEDULE.fields.items() if req}
    assert required == set(LRSchedule.PROGRESS)


def test_only_the_checkpoint_module_reads_checkpoint_metadata():
    """Guard: every reader goes through checkpoint.read (and so through the schema): no other
    module opens safetensors files or reads their metadata."""
    import ast

    # (module, name) -> why it may: export reads back the state-dict file it has just written
    # (tensors only, no checkpoint metadata) to verify it.
    allowed = {("serving/export.py", "load_file")}
    package = Path(checkpoint.__file__).resolve().parents[1]
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel == "training/checkpoint.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if isinstance(node, ast.Attribute) and name in ("decode", "read_metadata"):
                owner = node.value.id if isinstance(node.value, ast.Name) else ""
                name = f"{owner}.{name}" if owner in ("checkpoint", "metadata") else None
            if name in ("safe_open", "load_file", "META_KEY", "header_step", "checkpoint.decode") and (
                (rel, name) not in allowed
            ):
                found.append(f"{rel}:{node.lineno}: {name}")
    assert not found, found
    source = Path(checkpoint.__file__).read_text()
    assert "metadata.check(info, path)" in source.split("def decode", 1)[1].split("\ndef ", 1)[0]


# -- Hypothesis: any mutation of a real checkpoint's metadata ------------------------------------
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def paths(node, prefix=()):
    """Every path to a value in a JSON document (config's inside skipped but its root kept)."""
    yield prefix
    if prefix == ("config",):
        return
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


def mutate(info, data):
    """Apply 1-3 generated changes: drop a key, replace a value by junk (nan, inf, huge ints,
    nested structures, strings), stringify or wrap a value, add an unknown key."""
    doc = json.loads(json.dumps(info))
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        where = data.draw(st.sampled_from([p for p in paths(doc) if p]), label="path")
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        key, old = where[-1], parent[where[-1]]
        op = data.draw(st.sampled_from(["drop", "junk", "str", "wrap", "extra", "neighbour"]), label="op")
        if op == "drop" and isinstance(parent, dict):
            del parent[key]
        elif op == "str":
            parent[key] = str(old)
        elif op == "wrap":
            parent[key] = [old]
        elif op == "extra" and isinstance(old, dict):
            old[data.draw(st.text(min_size=1, max_size=8), label="new key")] = data.draw(JUNK, label="value")
        elif op == "neighbour" and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = old + data.draw(st.sampled_from([-1, 1, -0.5, 1e300, -(2**63)]), label="delta")
        else:
            parent[key] = data.draw(JUNK, label="junk")
    return doc


FUZZ_COUNT = {"examples": 0, "accepted": 0, "refused": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_any_mutated_metadata_is_accepted_and_usable_or_one_checkpoint_error(real_run, data):
    src = latest_checkpoint(real_run)
    info, tensors = contents(src)
    doc = mutate(info, data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / src.name
        text = json.dumps(doc, sort_keys=True)
        if data.draw(st.booleans(), label="cut the JSON text"):
            text = text[: data.draw(st.integers(0, len(text)), label="cut")]
        rewrite(path, text=text, tensors=tensors)
        FUZZ_COUNT["examples"] += 1
        try:
            saved = checkpoint.read(path)
        except CheckpointError as exc:  # the one error type: one line naming the file
            FUZZ_COUNT["refused"] += 1
            msg = str(exc)
            assert str(path) in msg and "\n" not in msg and len(msg) < 600, msg
            return
        FUZZ_COUNT["accepted"] += 1
        use(saved, path, real_run, Path(tmp))


def use(saved: dict, path: Path, real_run: Path, tmp: Path) -> None:
    """Everything a resume and the serving commands do with the fields: accepted metadata must
    never raise anything but a CheckpointError here."""
    Position(**saved["position"])
    Totals(**saved["stats"]["totals"])
    LRSchedule(lr=0.1).load_state_dict(saved["schedule"])
    TrainMeter(SimpleNamespace(device=torch.device("cpu"))).load_state_dict(saved["stats"]["meter"])
    checkpoint.class_names(saved)
    assert all(math.isfinite(v) for v in saved["stats"]["meter"].values())
    for check in (
        lambda: checkpoint.check_architecture(
            saved, AlexNetSpec(**contents(latest_checkpoint(real_run))[0]["spec"]), path
        ),
        lambda: checkpoint.check_same_steps(saved, saved["config"], (), path),
        lambda: checkpoint.reference_from_state(saved, path),
    ):
        try:
            check()
        except CheckpointError:
            pass
    run = tmp / "records"
    run.mkdir()
    shutil.copyfile(real_run / "metrics.jsonl", run / "metrics.jsonl")
    last = saved.get("last_eval") or {}
    RunLog(str(run), True, plots=False).trim_after(saved["position"]["step"], carried=last)
    assert last.get("step", 0) <= saved["position"]["step"]


def test_property_counts_are_reported():
    """Runs after the property test (file order): it generated examples, and both outcomes."""
    if FUZZ_COUNT["examples"] == 0:
        pytest.skip("the property test did not run in this session")
    print(f"metadata fuzz: {FUZZ_COUNT}")
    assert FUZZ_COUNT["refused"] > 0 and FUZZ_COUNT["accepted"] > 0, FUZZ_COUNT


# -- end to end: a resume and the serving commands refuse, nothing written ------------------------
def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("resume", ["auto", "path"])
def test_resume_from_bad_metadata_is_refused_and_the_run_dir_untouched(real_run, tmp_path, resume):
    out = tmp_path / "run"
    shutil.copytree(real_run, out)
    ckpt = latest_checkpoint(out)
    rewrite(ckpt, changed(contents(ckpt)[0], "last_eval.step", "5"))
    before = snapshot(out)
    target = "auto" if resume == "auto" else str(ckpt)
    proc = run_cli(*RUN, "train.epochs=2", f"train.resume={target}", f"train.output_dir={out}", check=False)
    assert_bad_input(proc, str(ckpt), "metadata: last_eval.step must be an int", "got '5'")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("script", "args"), [(EVALUATE, ()), (EXPORT, ("--format", "state-dict"))], ids=["evaluate", "export"]
)
def test_serving_commands_refuse_bad_metadata(real_run, tmp_path, script, args):
    out = tmp_path / "run"
    shutil.copytree(real_run, out)
    ckpt = latest_checkpoint(out)
    rewrite(ckpt, changed(contents(ckpt)[0], "last_eval.test_acc", "high"))
    before = snapshot(out)
    proc = run_cli(str(ckpt), *args, script=script, check=False)
    assert_bad_input(proc, str(ckpt), "metadata: last_eval.test_acc must be a finite number in [0.0, 1.0]")
    assert snapshot(out) == before
