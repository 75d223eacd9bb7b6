"""Absolute oracles for the path every placement shares (in-process, one CPU process).

Most placement tests compare placements with each other, so a bug in the code
they all run (the SGD step, the meters, the schedule's use in the loop, the
guards) moves every placement alike and goes unseen.  These tests drive
distalex's real ``Trainer`` and check it against the chapter's loop written
from scratch (tests/helpers.py, "absolute references"):

* the training steps of ``single`` equal hand-written ``torch.optim.SGD`` steps
  on the same weights, batches and dropout masks: loss, logits, every weight
  and momentum buffer after every step, also across an epoch boundary and a
  resume;
* every figure the run logs equals a recomputation from the raw per-batch
  logits (training) and from the saved weights (evaluation);
* the plateau schedule, driven through the loop, keeps the rate while the
  validation error falls and cuts it when the error stalls, also after a resume;
* each guard reports the failure it owns, at the right step, in its exact words.

The model is watched with PyTorch's own forward and optimizer hooks, registered
by the tests; the product code has no test hooks.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distalex.config import load_config
from distalex.data import build_data
from distalex.errors import NonFiniteLoss
from distalex.model.alexnet import AlexNet, AlexNetSpec
from distalex.model.dropout import mask_seed
from distalex.training.build import build_run
from distalex.training.checkpoint import checkpoint_dir, list_checkpoints, read
from distalex.training.trainer import Trainer

from helpers import (
    TINY,
    inner_optimizer,
    metrics,
    nan_loss_at,
    reference_counts,
    reference_sgd,
    reference_step,
    rel_err,
    summary,
)

CPU = torch.device("cpu")
# The tiny recipe (1/8 width, 67x67, lr 0.05, momentum 0.9) on synthetic data: 96 training
# images in batches of 32 are 3 steps per epoch; fp32 so that "equal" means float rounding.
BASE = [
    "tracking.wandb=false",
    "tracking.plots=false",
    "train.progress=false",
    "train.mixed_precision=no",
    "data.name=synthetic",
    "data.synthetic_train_size=96",
    "data.synthetic_test_size=50",
    "train.batch_size=32",
]
STEPS_PER_EPOCH = 3


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """Pin the in-process trainer to the CPU, as cli_env pins the CLI's processes: the oracles
    compare against CPU batches and the CPU RNG's dropout masks on any machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def make_trainer(out, *overrides) -> Trainer:
    cfg = load_config(TINY, [*BASE, f"train.output_dir={out}", *overrides])
    return Trainer(build_run(cfg))


class Recorder:
    """Every forward of a module: mode, input, output and the global RNG state it started from
    (so a reference model can be given the same dropout masks)."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list = []
        self._rng = None
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, module, inputs) -> None:
        self._rng = torch.get_rng_state()

    def _after(self, module, inputs, output) -> None:
        self.calls.append(
            SimpleNamespace(
                training=module.training, x=inputs[0].detach().clone(), logits=output.detach().clone(), rng=self._rng
            )
        )

    @property
    def training(self) -> list:
        return [c for c in self.calls if c.training]


def global_batches(cfg, epochs) -> list:
    """(epoch, images, labels) of every training step, from a loader built anew (one replica)."""
    loader = build_data(cfg, 0, 1, CPU).train
    return [(e, x, y) for e in range(epochs) for x, y in loader.epoch(e)]


def checkpoint_path(out, step: int):
    """The checkpoint file of ``step`` (whatever its extension)."""
    found = sorted(checkpoint_dir(str(out)).glob(f"step_{step:09d}.*"))
    assert len(found) == 1, f"no checkpoint for step {step} in {out}"
    return found[0]


def checkpoint_at(out, step: int) -> dict:
    return read(checkpoint_path(out, step))


def saved_model(saved: dict) -> AlexNet:
    """The reference network holding a checkpoint's weights."""
    model = AlexNet(AlexNetSpec(**saved["spec"]))
    model.load_state_dict(saved["model"])
    return model


# --------------------------------------------------------------------------- one step = the chapter's step


class HandMaskedDropout(torch.nn.Module):
    """The placement-invariant mask as the design states it, computed here: uniform draws of a
    generator seeded by mask_seed(train.seed, step, layer) over [global batch, all units],
    kept where >= p, kept activations scaled by 1 / (1 - p)."""

    def __init__(self, p: float, layer: int, seed: int):
        super().__init__()
        self.p, self.layer, self.seed, self.step = p, layer, seed, 0

    def forward(self, x):
        generator = torch.Generator().manual_seed(mask_seed(self.seed, self.step, self.layer))
        keep = torch.rand(x.shape, generator=generator) >= self.p
        return torch.where(keep, x / (1 - self.p), torch.zeros_like(x))


def replay(trainer_cfg, start_model, calls, batches):
    """The chapter's loop over ``batches`` on a copy of ``start_model``, with each step's dropout
    masks those the design specifies (``model.dropout_rng=placement_invariant``: keyed by seed,
    step and layer, computed here by hand) or taken from the RNG state distalex's forward started
    from (``process``: nn.Dropout).  Yields per step (step, loss, logits, model, optimizer) after the step."""
    model = copy.deepcopy(start_model)
    keyed = trainer_cfg.model.dropout_rng == "placement_invariant"
    if keyed:
        for layer in (6, 7):
            setattr(model, f"drop{layer}", HandMaskedDropout(trainer_cfg.model.dropout, layer, trainer_cfg.train.seed))
    opt = reference_sgd(model, trainer_cfg.optim)
    for k, ((_, x, y), call) in enumerate(zip(batches, calls, strict=True), start=1):
        assert torch.equal(call.x, x), f"step {k}: distalex trained on another batch"
        torch.set_rng_state(call.rng)
        if keyed:
            model.drop6.step = model.drop7.step = k - 1  # the steps before this one
        loss, logits = reference_step(model, opt, x, y)
        yield k, loss, logits, model, opt


def assert_state_equals_reference(saved: dict, start: dict, model, opt, step: int) -> None:
    """Every weight's update since ``start`` and every momentum buffer, to float rounding."""
    for name, p in model.named_parameters():
        want = p.detach() - start[name]
        got = saved["model"][name] - start[name]
        assert want.norm() > 0, f"step {step}: {name} did not move in the reference"
        assert rel_err(got, want) <= 1e-4, f"step {step}: update of {name} differs ({rel_err(got, want):.2e})"
        buf = opt.state[p].get("momentum_buffer")
        if buf is not None:
            assert rel_err(saved["momentum"][name], buf) <= 1e-4, f"step {step}: momentum of {name}"


@pytest.mark.parametrize(
    "recipe",
    [
        ["optim.momentum=0.9", "optim.weight_decay=0.005", "train.channels_last=true"],
        ["optim.momentum=0.0", "optim.weight_decay=0.0", "optim.lr=0.02", "train.channels_last=false"],
        ["optim.momentum=0.9", "model.dropout_rng=process"],
    ],
    ids=["momentum-decay-channels-last", "plain-sgd", "per-process-dropout"],
)
def test_single_steps_equal_handwritten_sgd_steps(tmp_path, recipe):
    """Six steps (two epochs, dropout on) of ``single`` = six steps of the chapter's loop with
    torch.optim.SGD(lr, momentum, weight_decay) from the config: loss, logits, weights, momentum."""
    out = tmp_path / "run"
    trainer = make_trainer(
        out, *recipe, "train.epochs=2", "train.log_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=10"
    )
    cfg = trainer.cfg
    assert cfg.model.dropout > 0  # the masks are part of the comparison
    start_model = copy.deepcopy(trainer.state.model)
    start = {k: v.detach().clone() for k, v in start_model.named_parameters()}
    if cfg.train.channels_last:  # a layout change of the weights, asked for by the config
        assert trainer.state.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    rec = Recorder(trainer.state.model)
    trainer.fit()

    batches = global_batches(cfg, 2)
    assert len(rec.training) == len(batches) == 2 * STEPS_PER_EPOCH
    losses = {r["step"]: r["loss"] for r in metrics(out) if "train_acc" not in r}
    for k, loss, logits, model, opt in replay(cfg, start_model, rec.training, batches):
        torch.testing.assert_close(rec.training[k - 1].logits, logits, rtol=1e-4, atol=1e-5)
        assert losses[k] == pytest.approx(loss, rel=1e-5, abs=1e-7), f"step {k}"
        assert_state_equals_reference(checkpoint_at(out, k), start, model, opt, k)


def test_resumed_single_run_continues_the_handwritten_loop(tmp_path):
    """Resume mid-epoch from step 4's checkpoint: steps 5 and 6 are the chapter's steps 5 and 6
    of the uninterrupted loop (weights, momentum, dropout RNG and position come back)."""
    whole = tmp_path / "whole"
    recipe = ["optim.weight_decay=0.005", "train.epochs=2", "train.log_every=1", "train.checkpoint_every=1"]
    trainer = make_trainer(whole, *recipe, "train.keep_checkpoints=10")
    start_model = copy.deepcopy(trainer.state.model)
    start = {k: v.detach().clone() for k, v in start_model.named_parameters()}
    rec = Recorder(trainer.state.model)
    trainer.fit()

    resumed = make_trainer(tmp_path / "resumed", *recipe, f"train.resume={checkpoint_path(whole, 4)}")
    assert resumed.state.position.step == 4
    rec2 = Recorder(resumed.state.model)
    resumed.fit()
    assert len(rec2.training) == 2
    for a, b in zip(rec.training[4:], rec2.training, strict=True):
        assert torch.equal(a.x, b.x), "the resumed run trained on other batches"
        assert torch.equal(a.rng, b.rng), "the resumed run's dropout RNG differs from the uninterrupted run's"

    batches = global_batches(resumed.cfg, 2)
    steps = list(replay(resumed.cfg, start_model, rec.training, batches))
    _, _, _, model, opt = steps[-1]
    final = checkpoint_at(tmp_path / "resumed", 6)
    assert_state_equals_reference(final, start, model, opt, 6)


# --------------------------------------------------------------------------- logged figures = recomputation


def test_every_logged_figure_equals_a_recomputation_from_raw_batches(tmp_path):
    """Step rows, epoch rows and the summary against figures recomputed from the logits of every
    training batch (as the model produced them, dropout on) and from each epoch's saved weights."""
    out = tmp_path / "run"
    # 112 images: 3 batches of 32 per epoch, 16 left over (dropped); rows every 2 steps, so the
    # row of step 4 covers the last step of epoch 1 and the first of epoch 2.  50 test images in
    # evaluation batches of 16 (the last one partial).
    trainer = make_trainer(
        out,
        "data.synthetic_train_size=112",
        "train.epochs=2",
        "train.log_every=2",
        "eval.batch_size=16",
        "train.keep_checkpoints=10",
    )
    cfg = trainer.cfg
    rec = Recorder(trainer.state.model)
    result = trainer.fit()

    batches = global_batches(cfg, 2)
    assert len(rec.training) == len(batches) == 6
    per_step = []  # (epoch, loss, correct, n) of each training step, recomputed
    for (epoch, x, y), call in zip(batches, rec.training, strict=True):
        assert torch.equal(call.x, x)
        logits = call.logits.double()
        per_step.append((epoch, F.cross_entropy(logits, y).item(), int((logits.argmax(1) == y).sum()), len(y)))
    # evaluation ran in eval mode: 2 epochs x 4 evaluation batches, none of them in training mode
    assert len(rec.calls) - len(rec.training) == 2 * 4

    rows = metrics(out)
    step_rows = [r for r in rows if "train_acc" not in r]
    epoch_rows = [r for r in rows if "train_acc" in r]
    assert [r["step"] for r in step_rows] == [2, 4, 6]
    for r in step_rows:
        interval = [s[1] for s in per_step[r["step"] - 2 : r["step"]]]
        assert r["loss"] == pytest.approx(sum(interval) / len(interval), rel=1e-6), r
        assert r["epoch"] == pytest.approx(r["step"] / STEPS_PER_EPOCH)
        assert r["lr"] == cfg.optim.lr

    assert [r["step"] for r in epoch_rows] == [3, 6]
    test = build_data(cfg, 0, 1, CPU).test
    for e, r in enumerate(epoch_rows):
        steps = [s for s in per_step if s[0] == e]
        seen = sum(s[3] for s in steps)
        assert seen == STEPS_PER_EPOCH * 32
        assert r["loss"] == pytest.approx(sum(s[1] * s[3] for s in steps) / seen, rel=1e-6), r
        assert r["train_acc"] == sum(s[2] for s in steps) / seen, r
        # examples/sec counts every example of the epoch's steps, over the steps' time
        assert r["examples_per_sec"] * r["epoch_time_s"] == pytest.approx(seen, rel=1e-9), r
        # test figures: the weights saved at the epoch's end, evaluated by hand in eval mode
        model = saved_model(checkpoint_at(out, r["step"]))
        top1, top5, n = reference_counts(model, test.eval_batches(50))
        assert n == 50
        assert (r["test_acc"], r["test_top5"]) == (top1 / n, top5 / n), r
        assert r["test_top5"] > r["test_acc"]  # the two figures are told apart here

    s = summary(out)
    last = epoch_rows[-1]
    assert {k: s[k] for k in ("loss", "train_acc", "test_acc", "test_top5")} == {
        k: last[k] for k in ("loss", "train_acc", "test_acc", "test_top5")
    }
    assert (s["steps"], s["epochs"]) == (6, 2.0)
    totals = checkpoint_at(out, 6)["stats"]["totals"]
    assert totals["train_examples"] == 6 * 32
    assert s["examples_per_sec"] == pytest.approx(totals["train_examples"] / totals["train_time"], rel=1e-9)
    assert result["examples_per_sec"] == s["examples_per_sec"]


# --------------------------------------------------------------------------- the schedule, through the loop

# Test accuracies the scripted evaluation reports, epoch by epoch, and the validation error they
# mean.  Plateau, patience 1 (the paper's rule, torch's ReduceLROnPlateau): the rate is divided by
# 10 after the second epoch in a row without a new best error.
#   epoch       1     2     3     4     5     6
#   error      .50   .40   .40   .40   .30   .20
#   best?      yes   yes   no    no    yes   yes
#   bad count   0     0     1     2->cut 0     0
ACCURACIES = [0.5, 0.6, 0.6, 0.6, 0.7, 0.8]
LR = 0.05
# The rate each epoch trains with: a cut after epoch 4 is used from epoch 5 on.  (Fed the accuracy
# instead of the error, the schedule would cut after epoch 3, while the error is falling.)
EPOCH_LRS = [LR, LR, LR, LR, LR / 10, LR / 10]


def scripted_evaluation(trainer: Trainer, accuracies) -> None:
    """Replace the trainer's evaluation by one that reports the given test accuracies in turn."""
    queue = list(accuracies)
    trainer.evaluate = lambda: {"test_acc": queue.pop(0)}


def step_lrs(trainer: Trainer) -> list:
    """The learning rate of every optimizer step the trainer takes (read by a torch step hook)."""
    lrs = []
    inner_optimizer(trainer).register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    return lrs


PLATEAU = [
    f"optim.lr={LR}",
    "optim.schedule=plateau",
    "optim.plateau_patience=1",
    "data.synthetic_train_size=64",  # 2 steps per epoch
    "train.log_every=100",
]


def test_plateau_keeps_the_rate_while_the_error_falls_and_cuts_it_when_it_stalls(tmp_path):
    trainer = make_trainer(tmp_path / "run", *PLATEAU, "train.epochs=6")
    scripted_evaluation(trainer, ACCURACIES)
    lrs = step_lrs(trainer)
    trainer.fit()
    assert lrs == pytest.approx([lr for lr in EPOCH_LRS for _ in range(2)], rel=1e-12)
    rows = [r for r in metrics(tmp_path / "run") if "train_acc" in r]
    assert [r["lr"] for r in rows] == pytest.approx(EPOCH_LRS, rel=1e-12)
    assert [r["test_acc"] for r in rows] == ACCURACIES


def test_plateau_cut_survives_a_resume(tmp_path):
    """Stopped after epoch 4 (just after the cut) and resumed: epochs 5 and 6 train at the cut rate."""
    out = tmp_path / "run"
    first = make_trainer(out, *PLATEAU, "train.epochs=4")
    scripted_evaluation(first, ACCURACIES[:4])
    lrs = step_lrs(first)
    first.fit()
    first.close()  # gives the output dir back, as the CLI does
    resumed = make_trainer(out, *PLATEAU, "train.epochs=6", "train.resume=auto")
    assert resumed.state.position.epoch == 4
    scripted_evaluation(resumed, ACCURACIES[4:])
    later = step_lrs(resumed)
    resumed.fit()
    assert lrs + later == pytest.approx([lr for lr in EPOCH_LRS for _ in range(2)], rel=1e-12)


# --------------------------------------------------------------------------- the guards, each on its own path

NAN_STEP = 4  # the first step of epoch 2


def test_non_finite_loss_with_finite_weights_is_reported_as_the_loss_at_its_step(tmp_path):
    """The loss of step 4 is NaN (its logits are poisoned) but the weights stay finite (step 4's
    update is skipped, as a gradient scaler would): the loss guard must stop the run, naming step 4."""
    out = tmp_path / "run"
    trainer = make_trainer(out, "train.epochs=3", "train.log_every=100", "train.checkpoint_every=1")
    nan_loss_at(trainer, NAN_STEP)
    with pytest.raises(NonFiniteLoss) as err:
        trainer.fit()
    newest = list_checkpoints(str(out))[-1]
    assert str(err.value) == (
        f"loss is not finite at step {NAN_STEP}; stopping. The newest checkpoint, {newest}, is kept."
    )
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())
    assert [read(p)["position"]["step"] for p in list_checkpoints(str(out))] == [1, 2, 3]


def test_non_finite_weights_with_a_finite_loss_are_reported_as_parameters(tmp_path):
    """Step 4's update leaves an infinite weight while every loss so far is finite: the parameter
    guard must refuse step 4's checkpoint and say so."""
    out = tmp_path / "run"
    trainer = make_trainer(out, "train.epochs=3", "train.log_every=1", "train.checkpoint_every=1")
    losses = []  # a finite function of each training step's logits

    def watch(module, inputs, output):
        if module.training:
            losses.append(output.detach().logsumexp(1).mean().item())

    trainer.state.model.register_forward_hook(watch)

    def break_a_weight(opt, args, kwargs):
        if len(losses) == NAN_STEP:
            with torch.no_grad():
                trainer.state.model.fc8.weight[0, 0] = math.inf

    inner_optimizer(trainer).register_step_post_hook(break_a_weight)
    with pytest.raises(NonFiniteLoss) as err:
        trainer.fit()
    newest = list_checkpoints(str(out))[-1]
    assert str(err.value) == (
        f"parameters are not finite after step {NAN_STEP}; stopping. The newest checkpoint, {newest}, is kept."
    )
    assert len(losses) == NAN_STEP and all(math.isfinite(v) for v in losses)
    # step 4's row was logged (its loss is finite); its checkpoint was refused
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 3, 4]
    assert [read(p)["position"]["step"] for p in list_checkpoints(str(out))] == [1, 2, 3]
