"""The LR schedules (distalex/training/schedule.py): constant (d2l) and plateau ÷10 (the
paper, §5), their semantics against torch's ReduceLROnPlateau, and an exact
resume of the schedule through the real CLI."""

import random

import pytest
import torch

from distalex.config import load_config
from distalex.training.checkpoint import read
from distalex.training.schedule import LRSchedule

from helpers import ROOT, TINY, latest_checkpoint, metrics, run_cli

ROOT_LR = 0.01


def plateau(patience: int, lr: float = ROOT_LR, min_lr: float = 0.0) -> LRSchedule:
    return LRSchedule(lr=lr, kind="plateau", factor=0.1, patience=patience, min_lr=min_lr)


def trajectory(schedule: LRSchedule, errors) -> list:
    """The rate used in each epoch, given each epoch's validation error."""
    used = []
    for err in errors:
        used.append(schedule.lr)
        schedule.step_epoch(err)
    return used


# --------------------------------------------------------------------------- plateau


@pytest.mark.parametrize("patience", [0, 1, 2, 3, 5])
def test_plateau_divides_by_ten_after_patience(patience):
    s = plateau(patience)
    assert s.step_epoch(0.5) is False  # the first epoch improves on +inf
    for _ in range(patience):  # `patience` stalled epochs are tolerated
        assert s.step_epoch(0.5) is False and s.lr == ROOT_LR
    assert s.step_epoch(0.5) is True  # one more: the rate is divided by 10
    assert s.lr == pytest.approx(ROOT_LR / 10) and s.reductions == 1 and s.bad_epochs == 0
    # the count starts again after a reduction
    for _ in range(patience):
        assert s.step_epoch(0.5) is False and s.lr == pytest.approx(ROOT_LR / 10)
    assert s.step_epoch(0.6) is True and s.lr == pytest.approx(ROOT_LR / 100)


def test_equal_error_is_not_an_improvement():
    s = plateau(0)
    trajectory(s, [0.3, 0.3])
    assert s.reductions == 1 and s.best == 0.3


def test_improvement_resets_the_count():
    s = plateau(2)
    errors = [0.5, 0.6, 0.6, 0.4, 0.45, 0.5, 0.39, 0.42, 0.41, 0.5, 0.5]
    #  count:   -   1    2    0    1    2     0    1     2    3!   1
    # without the resets the third stalled epoch (index 4) would already reduce
    L = ROOT_LR
    assert trajectory(s, errors) == pytest.approx([L] * 10 + [L / 10])
    assert s.best == 0.39 and s.reductions == 1 and s.bad_epochs == 1


def test_min_lr_stops_further_reductions():
    """The paper's config: 0.01 -> 1e-5 is exactly three reductions (§5), then no more."""
    cfg = load_config(str(ROOT / "configs" / "paper_imagenet.yaml"), [])
    s = LRSchedule.from_config(cfg.optim)
    assert (s.kind, s.lr, s.factor, s.patience, s.min_lr) == ("plateau", 0.01, 0.1, 1, 1e-5)
    used = trajectory(s, [0.9] * 40)
    assert s.reductions == 3 and s.lr == pytest.approx(1e-5)
    assert sorted(set(used), reverse=True) == pytest.approx([1e-2, 1e-3, 1e-4, 1e-5])
    assert used[-1] == s.lr  # stays at the floor
    # a floor that is not a power of ten away: the rate never goes below it
    s = plateau(0, lr=0.01, min_lr=0.0005)
    trajectory(s, [0.9] * 20)
    assert s.lr == pytest.approx(0.001) and s.reductions == 1


def test_constant_never_changes():
    s = LRSchedule(lr=0.05, kind="constant", patience=0)
    rng = random.Random(0)
    for _ in range(50):
        assert s.step_epoch(rng.choice([0.9, 0.5, 0.5, 1.0])) is False
    assert s.lr == 0.05 and s.reductions == 0
    # the d2l default config uses it
    d2l = LRSchedule.from_config(load_config(None, []).optim)
    assert d2l.kind == "constant"


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_plateau_matches_torch_reduce_lr_on_plateau(patience):
    """Same decisions as ReduceLROnPlateau(mode=min, threshold=0) on noisy error curves with ties."""
    rng = random.Random(patience)
    errors = [rng.choice([0.30, 0.31, 0.32, 0.33]) - 0.002 * i for i in range(40)]
    errors = [round(e, 3) for e in errors]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=ROOT_LR)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.1, patience=patience, threshold=0.0, cooldown=0, min_lr=0.0, eps=0.0
    )
    ours, torch_lrs = plateau(patience), []
    for err in errors:
        torch_lrs.append(opt.param_groups[0]["lr"])
        ref.step(err)
    assert trajectory(ours, errors) == pytest.approx(torch_lrs, rel=1e-12)
    assert ours.reductions >= 1  # the curve did stall somewhere


def test_apply_and_state_dict_round_trip():
    s = plateau(2)
    trajectory(s, [0.5, 0.4, 0.45, 0.45, 0.45, 0.47])  # one reduction, then one bad epoch
    assert (s.reductions, s.bad_epochs, s.best) == (1, 1, 0.4)
    state = s.state_dict()
    fresh = plateau(2)
    fresh.load_state_dict(state)
    assert fresh == s
    errors = [0.46, 0.46, 0.39, 0.5, 0.5, 0.5]
    assert trajectory(fresh, errors) == trajectory(s, errors)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh.apply(opt)
    assert opt.param_groups[0]["lr"] == fresh.lr


# --------------------------------------------------------------------------- resume through the CLI

EPOCHS, STOP_AT = 6, 2
# 64 synthetic images, batch 32: 2 steps/epoch.  lr 1e-9 leaves the weights
# (all but a few ulps) unchanged, so the validation error never improves after
# the first epoch (which always improves on +inf).  patience 1: the rate drops
# after epochs 3 and 5 (used from epochs 4 and 6); stopping after epoch 2 cuts
# the first stall in half, so the resumed run only reduces on time if `best`
# and `bad_epochs` came back from the checkpoint.
LR = 1e-9
RUN = [
    "--config",
    TINY,
    "tracking.wandb=false",
    "tracking.plots=false",
    "train.progress=false",
    "data.name=synthetic",
    "data.synthetic_train_size=64",
    "data.synthetic_test_size=64",
    "train.batch_size=32",
    "train.log_every=1",
    "model.dropout=0",
    f"optim.lr={LR}",
    "optim.momentum=0",
    "optim.schedule=plateau",
    "optim.plateau_patience=1",
]


def epoch_rows(run_dir):
    return [r for r in metrics(run_dir) if "train_acc" in r]


def test_plateau_schedule_survives_checkpoint_and_resume(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_cli(*RUN, f"train.epochs={EPOCHS}", f"train.output_dir={whole}")
    run_cli(*RUN, f"train.epochs={STOP_AT}", f"train.output_dir={parts}")
    stopped = read(latest_checkpoint(parts))
    assert stopped["position"]["epoch"] == STOP_AT and stopped["position"]["batch"] == 0
    assert stopped["schedule"]["bad_epochs"] == 1 and stopped["schedule"]["reductions"] == 0
    proc = run_cli(*RUN, f"train.epochs={EPOCHS}", f"train.output_dir={parts}", "train.resume=auto")
    assert "resumed from" in proc.stdout + proc.stderr

    a, b = epoch_rows(whole), epoch_rows(parts)
    assert len({r["test_acc"] for r in a}) == 1, "validation error changed: the setup assumes it cannot"
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [float(e) for e in range(1, EPOCHS + 1)]
    L = LR
    assert [r["lr"] for r in a] == pytest.approx([L, L, L, L / 10, L / 10, L / 100], rel=1e-12)
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    # the step rows too (logged every step, one row per step after the resume's trim)
    steps_a = [(r["step"], r["lr"]) for r in metrics(whole) if "train_acc" not in r and "lr" in r]
    steps_b = [(r["step"], r["lr"]) for r in metrics(parts) if "train_acc" not in r and "lr" in r]
    assert steps_a == steps_b and len(steps_a) == EPOCHS * 2

    end_a, end_b = read(latest_checkpoint(whole)), read(latest_checkpoint(parts))
    assert end_a["schedule"] == end_b["schedule"]
    assert end_a["schedule"]["reductions"] == 2
    assert all(torch.equal(end_a["model"][k], end_b["model"][k]) for k in end_a["model"])
