"""Records exact after a kill at any instant, the two mechanisms without a training run:

* every rank's running figures go into the checkpoint unreduced and come back to the same
  rank (:func:`distalex.training.checkpoint.meter_for_rank`); in another placement the
  epoch's sums carry over; a malformed ``stats.meters`` is refused with one line;
* on resume the records are cut back to what they were when the checkpoint was written
  (:meth:`distalex.telemetry.records.RunLog.trim_after`), for a kill after any write of a
  run of any shape (Hypothesis generates the shapes; the write order modelled here is the
  trainer's: step row, step checkpoint, epoch row, curves, the epoch's checkpoint).

The end-to-end proof in every placement: tests/e2e/test_reliability.py
(``test_kill_at_every_instant_of_a_step_...``)."""

import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_checkpoint_safety import crafted, real_state

from distalex.errors import CheckpointError
from distalex.runtime.io import append_jsonl, read_jsonl
from distalex.telemetry.records import RunLog
from distalex.training import checkpoint
from distalex.training.meters import TrainMeter


# -- every rank's running figures -----------------------------------------------------------
def fake_placement(rank=0, replicas=1, world_size=1, split_mode="ddp"):
    """What the meter and the checkpoint's restore read of a placement (one process, no group)."""
    inner = world_size // replicas
    return SimpleNamespace(
        rank=rank,
        replica=rank // inner,
        split_mode=split_mode,
        device=torch.device("cpu"),
        mesh=SimpleNamespace(replicas=replicas, world_size=world_size),
        sum_over_replicas=lambda t: t,
        exchange_stats=SimpleNamespace(bytes_sent=0),
    )


def test_the_meter_saves_its_interval_and_epoch_sums_exactly():
    meter = TrainMeter(fake_placement())
    for step, loss in enumerate((2.3125, 2.1, 1.9), 1):
        logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
        meter.update(torch.tensor(loss), logits, torch.tensor([1, 1, 1]), step)
    again = TrainMeter(fake_placement())
    again.load_state_dict(json.loads(json.dumps(meter.state_dict())))  # through the checkpoint's JSON
    assert again.read_interval() == meter.read_interval()
    assert again.read_epoch() == meter.read_epoch()


def saved_meters(figures, replicas, split_mode="ddp", inner=1):
    """A checkpoint's contents as far as restoring the meter reads them."""
    meters = [
        {
            "loss_sum": f[0],
            "correct": f[1],
            "seen": f[2],
            "train_time": 1.0,
            "interval_loss": f[3],
            "interval_steps": 2.0,
            "exchange_bytes": 10 * rank,
            "replica": rank // inner,
        }
        for rank, f in enumerate(figures)
    ]
    world = len(figures)
    return {
        "stats": {"meter": {k: meters[0][k] for k in checkpoint.LEGACY_METER}, "meters": meters},
        "placement": {"split_mode": split_mode, "world_size": world, "replicas": replicas},
        "rng": [{}] * world,
    }


figures = st.lists(
    st.tuples(*[st.integers(0, 10**6).map(float)] * 4), min_size=1, max_size=8
)  # integral sums: added in any order, they are exact


@settings(max_examples=60, deadline=None)
@given(figures=figures, new_replicas=st.integers(1, 8), inner=st.sampled_from([1, 2]))
def test_each_rank_gets_its_own_figures_back_and_another_placement_keeps_the_epochs_sums(figures, new_replicas, inner):
    figures = figures * inner  # a replica of `inner` ranks (towers, stages) holds the same figures
    figures.sort()
    world = len(figures)
    replicas = world // inner
    figures = [figures[(r // inner) * inner] for r in range(world)]
    saved = saved_meters(figures, replicas, inner=inner)
    for rank in range(world):  # the same placement: every rank its own, to the bit
        p = fake_placement(rank, replicas, world)
        meter, sent = checkpoint.meter_for_rank(saved, p, same=True)
        assert (meter["loss_sum"], meter["correct"], meter["seen"], meter["interval_loss"]) == figures[rank]
        assert sent == 10 * rank
    # Another placement: the saved replicas' epoch sums, added over the new replicas, are the
    # saved run's (what its next epoch row reads); the interval starts afresh.
    totals = [0.0, 0.0, 0.0]
    for rank in range(new_replicas):
        meter, sent = checkpoint.meter_for_rank(saved, fake_placement(rank, new_replicas, new_replicas), same=False)
        totals = [t + meter[k] for t, k in zip(totals, ("loss_sum", "correct", "seen"), strict=True)]
        assert sent == 0 and "interval_loss" not in meter
    expected = [math.fsum(f[i] for f in figures[::inner]) for i in range(3)]
    assert totals == expected


def test_a_checkpoint_without_every_ranks_figures_restores_rank_0s_as_before():
    saved = saved_meters([(1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)], 2)
    del saved["stats"]["meters"]
    meter, sent = checkpoint.meter_for_rank(saved, fake_placement(1, 2, 2), same=True)
    assert meter == saved["stats"]["meter"] and sent == 0


def with_meters(meters, world_size=1, replicas=1):
    good = real_state()
    info = {k: v for k, v in good.items() if k not in ("model", "momentum", "rng")}
    info["rng_ranks"] = 1
    info["placement"] = {**info["placement"], "world_size": world_size, "replicas": replicas}
    info["stats"] = {**info["stats"], "meters": meters}
    return info


ENTRY = {
    "loss_sum": 1.5,
    "correct": 3.0,
    "seen": 64.0,
    "train_time": 0.5,
    "interval_loss": 0.25,
    "interval_steps": 1.0,
    "exchange_bytes": 0,
    "replica": 0,
}


def test_every_ranks_figures_round_trip(tmp_path):
    back = checkpoint.read(crafted(tmp_path, info=with_meters([ENTRY])))
    assert back["stats"]["meters"] == [ENTRY]


@pytest.mark.parametrize(
    ("meters", "why"),
    [
        ({"0": ENTRY}, "stats.meters must be a list"),
        ([ENTRY, ENTRY], "stats.meters must be one entry per rank"),
        ([{k: v for k, v in ENTRY.items() if k != "seen"}], "stats.meters[0].seen must be present"),
        ([{**ENTRY, "seen": "64"}], "stats.meters[0].seen must be a finite number"),
        ([{**ENTRY, "replica": True}], "stats.meters[0].replica must be an int"),
        ([{**ENTRY, "replica": 1}], "stats.meters[0].replica must be < placement.replicas (1)"),
        ([{**ENTRY, "exchange_bytes": 1.5}], "stats.meters[0].exchange_bytes must be an int"),
        ([{**ENTRY, "loss_sum": float("nan")}], "stats.meters[0].loss_sum must be a finite number"),
        ([{**ENTRY, "correct": -1.0}], "stats.meters[0].correct must be a finite number >= 0"),
        ([{**ENTRY, "extra": 1}], "stats.meters[0].extra must be absent (unknown key"),
    ],
)
def test_malformed_rank_figures_are_refused_in_one_line(tmp_path, meters, why):
    with pytest.raises(CheckpointError) as err:
        checkpoint.read(crafted(tmp_path, info=with_meters(meters)))
    assert why in str(err.value) and "\n" not in str(err.value)


# -- the records cut back on resume -----------------------------------------------------------
def run_writes(steps_per_epoch: int, max_steps: int, log_every: int, checkpoint_every: int | None) -> list:
    """The writes of an uninterrupted run, in the trainer's order: ("row", row) and
    ("checkpoint", step, the evaluation row it carries)."""
    writes, last_eval = [], {}
    for step in range(1, max_steps + 1):
        if step % log_every == 0:
            writes.append(("row", {"step": step, "epoch": step / steps_per_epoch, "loss": 1.0 / step}))
        if checkpoint_every and step % checkpoint_every == 0:
            writes.append(("checkpoint", step, dict(last_eval)))
        if step % steps_per_epoch == 0 or step == max_steps:
            last_eval = {"step": step, "loss": 0.5 / step, "train_acc": 0.25, "test_acc": step / 100}
            writes.append(("row", dict(last_eval)))  # then the curves: no row, no checkpoint
            writes.append(("checkpoint", step, dict(last_eval)))
    return writes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps_per_epoch=st.integers(1, 6),
    max_steps=st.integers(1, 14),
    log_every=st.integers(1, 4),
    checkpoint_every=st.one_of(st.none(), st.integers(1, 7)),
    torn=st.booleans(),
)
def test_after_a_kill_after_any_write_the_records_are_those_of_the_checkpoint(
    steps_per_epoch, max_steps, log_every, checkpoint_every, torn
):
    """Cut back to the checkpoint it resumes from, metrics.jsonl holds exactly the rows the
    uninterrupted run had written when it wrote that checkpoint: the resumed run, which
    repeats every write after it, then logs every row once."""
    writes = run_writes(steps_per_epoch, max_steps, log_every, checkpoint_every)
    for killed_after in range(len(writes) + 1):
        done = writes[:killed_after]
        checkpoints = [i for i, w in enumerate(done) if w[0] == "checkpoint"]
        if not checkpoints:
            continue  # a first start: resume=auto starts over
        j = checkpoints[-1]
        _, step, carried = done[j]
        with tempfile.TemporaryDirectory() as d:
            log = RunLog(d, is_main=True, plots=False)
            for w in done:
                if w[0] == "row":
                    append_jsonl(log.metrics_path, w[1])
            if torn:  # a kill during the next append
                with open(log.metrics_path, "a") as fh:
                    fh.write('{"step": ')
            log.trim_after(step, carried=carried)
            rows = read_jsonl(log.metrics_path) if Path(log.metrics_path).exists() else []
        assert rows == [w[1] for w in writes[:j] if w[0] == "row"], (killed_after, writes[killed_after - 1])


# -- guards: no running figure outside the checkpoint, no row outside RunLog -------------------
# Not saved, and why: the placement is the run's own; the clock runs only inside a training
# step; a non-finite loss stops the run before any checkpoint (Trainer.save checks first).
NOT_SAVED = {"placement", "_t0", "_bad_step"}


def test_every_running_figure_of_the_meter_is_in_its_state():
    """A figure added to the meter later is kept across a resume, or named in NOT_SAVED."""
    meter = TrainMeter(fake_placement())
    meter.update(torch.tensor(2.5), torch.tensor([[0.0, 1.0]]), torch.tensor([1]), 1)
    meter.train_time = 1.25
    again = TrainMeter(fake_placement())
    again.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    for name, value in vars(meter).items():
        if name not in NOT_SAVED:
            other = vars(again)[name]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"TrainMeter.{name} is not restored from the checkpoint"


def test_only_the_run_log_appends_rows():
    """Rows reach metrics.jsonl through RunLog only, whose trim_after is what a resume cuts
    back with (an AST scan of the package)."""
    import ast

    root = Path(checkpoint.__file__).resolve().parents[1]
    allowed = {root / "runtime" / "io.py", root / "telemetry" / "records.py"}
    callers = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in ("append_jsonl", "write_jsonl") and path not in allowed:
                    callers.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not callers, f"rows written outside RunLog: {callers}"
