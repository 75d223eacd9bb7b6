"""The figures a multi-process run logs, recomputed from scratch (real CLI, gloo ranks).

A run with a checkpoint after every step and dropout off leaves enough to recompute
everything it logged without trusting any of distalex's meters: step k's loss is
the cross-entropy of the weights after step k-1 (the init for k = 1) on global
batch k; the epoch rows' loss and training accuracy are means over the epoch's
examples; the test figures are the epoch-end weights evaluated by hand in eval
mode; examples/sec times the epoch's training time is the number of examples of
the epoch over all replicas.  In-process oracles of one process are in
tests/unit/test_oracles.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distalex.config import load_config
from distalex.data import build_data
from distalex.model.alexnet import AlexNet, AlexNetSpec, init_weights
from distalex.training.checkpoint import checkpoint_dir, read

from helpers import SPLIT_MODES, TINY, metrics, reference_counts, run_cli, summary

CPU = torch.device("cpu")
EPOCHS, BATCH, STEPS_PER_EPOCH = 2, 32, 3
SETTINGS = [
    "tracking.wandb=false",
    "tracking.plots=false",
    "train.progress=false",
    "train.mixed_precision=no",
    "data.name=synthetic",
    "data.synthetic_train_size=112",  # 3 global batches per epoch, 16 examples dropped
    "data.synthetic_test_size=50",
    f"train.batch_size={BATCH}",
    f"train.epochs={EPOCHS}",
    "model.dropout=0",  # so that the weights alone determine every step's logits
    "train.log_every=1",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=100",
    "eval.batch_size=16",
]


def saved(out, step: int) -> dict:
    """The checkpoint of ``step`` (whatever its extension)."""
    (path,) = checkpoint_dir(str(out)).glob(f"step_{step:09d}.*")
    return read(path)


def model_from(state: dict) -> AlexNet:
    model = AlexNet(AlexNetSpec(**state["spec"]))
    model.load_state_dict(state["model"])
    return model


def initial_model(spec: dict, seed: int) -> AlexNet:
    """The reference network initialised as every rank initialises it (seeded Xavier)."""
    torch.manual_seed(seed)
    model = AlexNet(AlexNetSpec(**spec))
    init_weights(model, "xavier")
    return model


@pytest.mark.parametrize("mode", ["ddp", "model-parallel"])
def test_multi_process_figures_equal_a_recomputation(tmp_path, mode):
    nprocs, split = SPLIT_MODES[mode]
    out = tmp_path / mode
    run_cli(*split, "--config", TINY, *SETTINGS, f"train.output_dir={out}", nprocs=nprocs)
    cfg = load_config(TINY, [*SETTINGS, f"train.output_dir={out}"], split_mode="single")
    data = build_data(cfg, 0, 1, CPU)  # the global batches, from one replica's view
    batches = [(e, x, y) for e in range(EPOCHS) for x, y in data.train.epoch(e)]
    assert len(batches) == EPOCHS * STEPS_PER_EPOCH

    first = saved(out, 1)
    before = initial_model(first["spec"], cfg.train.seed)
    per_step = []  # (epoch, loss, correct, n): the weights before step k on global batch k
    with torch.no_grad():
        for k, (epoch, x, y) in enumerate(batches, start=1):
            logits = before.eval()(x).double()
            per_step.append((epoch, F.cross_entropy(logits, y).item(), int((logits.argmax(1) == y).sum()), len(y)))
            before = model_from(saved(out, k))

    rows = metrics(out)
    step_rows = {r["step"]: r for r in rows if "train_acc" not in r}
    assert sorted(step_rows) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    for k, r in step_rows.items():
        assert r["loss"] == pytest.approx(per_step[k - 1][1], rel=1e-5), (k, r)
    epoch_rows = [r for r in rows if "train_acc" in r]
    assert [r["step"] for r in epoch_rows] == [3, 6]
    for e, r in enumerate(epoch_rows):
        steps = [s for s in per_step if s[0] == e]
        seen = sum(s[3] for s in steps)
        assert seen == STEPS_PER_EPOCH * BATCH
        assert r["loss"] == pytest.approx(sum(s[1] * s[3] for s in steps) / seen, rel=1e-5), r
        assert r["train_acc"] == sum(s[2] for s in steps) / seen, r
        assert r["examples_per_sec"] * r["epoch_time_s"] == pytest.approx(seen, rel=1e-9), r
        top1, top5, n = reference_counts(model_from(saved(out, r["step"])), data.test.eval_batches(50))
        assert n == 50 and (r["test_acc"], r["test_top5"]) == (top1 / n, top5 / n), r

    s = summary(out)
    assert s["world_size"] == nprocs and s["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert (s["loss"], s["train_acc"], s["test_acc"]) == tuple(
        epoch_rows[-1][k] for k in ("loss", "train_acc", "test_acc")
    )
    totals = saved(out, EPOCHS * STEPS_PER_EPOCH)["stats"]["totals"]
    assert totals["train_examples"] == EPOCHS * STEPS_PER_EPOCH * BATCH
    assert s["examples_per_sec"] == pytest.approx(totals["train_examples"] / totals["train_time"], rel=1e-9)
