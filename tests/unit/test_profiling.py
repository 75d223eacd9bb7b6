"""train.profile (distalex/telemetry/profiling.py): the classification of a step's time, on
synthetic event trees with known answers and on real profiles of the reference model."""

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function

from distalex.data import make_synthetic
from distalex.model.alexnet import AlexNet, AlexNetSpec
from distalex.parallel.mesh import Mesh
from distalex.parallel.placement import BACKWARD, placement_for
from distalex.telemetry.profiling import LAYER_GROUPS, STEP, StepProfiler, classify, ordered

from helpers import device_loader, png_size


@dataclass
class Span:
    start: float
    end: float

    def elapsed_us(self):
        return self.end - self.start


@dataclass
class Ev:
    """The parts of a profiler FunctionEvent that classify reads."""

    name: str
    start: float
    end: float
    children: list = field(default_factory=list)
    sequence_nr: int = -1
    self_device_time_total: float = 0.0

    @property
    def time_range(self):
        return Span(self.start, self.end)

    @property
    def cpu_children(self):
        return self.children


def synthetic_step():
    """One 100 us step: conv1's forward (10 us, 8 of them in the conv op), a backward
    (40 us) holding conv1's backward node (15 us) and an AccumulateGrad (2 us) that
    launches an all-reduce (1 us), the optimizer (5 us)."""
    conv = Ev("aten::convolution", 1, 9, sequence_nr=5)
    forward = Ev("compute:conv1", 0, 10, [conv])
    node = Ev("autograd::engine::evaluate_function: ConvolutionBackward0", 55, 70, sequence_nr=5)
    acc = Ev("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 70, 72,
             [Ev("c10d::allreduce_", 70, 71)])  # fmt: skip
    backward = Ev(BACKWARD, 50, 90, [node, acc])
    return Ev(f"{STEP}0", 0, 100, [forward, backward, Ev("Optimizer.step#SGD.step", 90, 95)])


def test_synthetic_step_without_ddp():
    got = classify([synthetic_step()], ddp=False)
    # conv1: its forward 10 + its backward node 15; the engine's 23 and AccumulateGrad's 1 are other,
    # with the step's own 45; the all-reduce outside DDP is comm:other.
    assert got == {"conv1": 25, "other": 45 + 23 + 1, "comm:other": 1, "optimizer": 5}
    assert sum(got.values()) == 100


def test_synthetic_step_with_ddp():
    got = classify([synthetic_step()], ddp=True)
    # Under DDP, backward's own time is the reducer's wait and the all-reduce is DDP's.
    assert got == {"conv1": 25, "other": 45 + 1, "comm:ddp": 23 + 1, "optimizer": 5}


def test_a_comm_label_claims_its_collectives_and_its_backward():
    gather = Ev("comm:tower", 10, 20, [Ev("c10d::allgather_", 11, 19)], sequence_nr=7)
    node = Ev("autograd::engine::evaluate_function: _GatherChannelsBackward", 60, 70, sequence_nr=7)
    step = Ev(f"{STEP}0", 0, 100, [gather, Ev(BACKWARD, 50, 90, [node])])
    got = classify([step], ddp=True)
    assert got["comm:tower"] == 20 and "comm:other" not in got


def test_device_time_mode_fills_the_rest_with_other():
    a = Ev("compute:conv2", 0, 10, [Ev("aten::convolution", 1, 9, self_device_time_total=30)])
    step = Ev(f"{STEP}0", 0, 100, [a, Ev("data:resize", 10, 12, self_device_time_total=5)])
    assert classify([step], device_time=True) == {"conv2": 30, "data": 5, "other": 65}


def test_order_of_the_bars():
    cats = ["other", "comm:tower", "optimizer", "fc6", "conv1", "data", "loss", "comm:ddp", "conv3"]
    assert ordered(cats) == ["data", "conv1", "conv3", "fc6", "loss", "optimizer", "comm:ddp", "comm:tower", "other"]


def placement(spec):
    return placement_for("single", Mesh(1, 1, 1), 0, torch.device("cpu"), spec)


def train_steps(model, loader, n, after_step, towers=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = loader.epoch(0)
    for _ in range(n):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        with record_function(BACKWARD):
            loss.backward()
        opt.step()
        opt.zero_grad()
        after_step()


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A real StepProfiler over 3 steps of the tiny reference model with LRN, fed by the device loader."""
    out = tmp_path_factory.mktemp("profiled")
    spec = AlexNetSpec(width=0.125, image_size=67, lrn=True, dropout=0.0)
    torch.manual_seed(0)
    model = AlexNet(spec)
    loader = device_loader(make_synthetic(64, 10, 1, 28, seed=1), 8, 67, 0, torch.device("cpu"))
    prof = StepProfiler(3, model, placement(spec), out, title="test")
    with prof:
        train_steps(model, loader, 6, prof.after_step)
    return out, model


def test_profile_files(profiled):
    out, model = profiled
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["warmup_steps"] == 2 and len(summary["ranks"]) == 1
    rank = summary["ranks"][0]
    ms = rank["ms_per_step"]
    assert set(LAYER_GROUPS) | {"data", "loss", "optimizer", "other"} <= set(ms)
    # Every microsecond of the steps is in exactly one category.
    assert sum(ms.values()) == pytest.approx(rank["step_ms"], rel=1e-3)
    trace = json.loads((out / "profile" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {f"{STEP}0", f"{STEP}2", "compute:conv1", "data:resize", BACKWARD} <= names
    assert f"{STEP}3" not in names  # exactly the 3 steps asked for
    _, width, height = png_size(out / "profile" / "profile.png")
    assert width > 300 and height > 100
    # The labels were hooks of the profile only: none is left on the model.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_backward_goes_to_the_layer_that_made_it(tmp_path):
    """Each group's time holds its backward nodes, matched by sequence number."""
    from torch.profiler import ProfilerActivity, profile

    from distalex.telemetry.profiling import _ModuleLabels

    spec = AlexNetSpec(width=0.125, image_size=67, lrn=True)
    model = AlexNet(spec)
    x, y = torch.rand(4, 1, 67, 67), torch.randint(0, 10, (4,))
    labels = _ModuleLabels(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(f"{STEP}0"):
            loss = F.cross_entropy(model(x), y)
            with record_function(BACKWARD):
                loss.backward()
    labels.remove()
    steps = [e for e in prof.events() if e.name == f"{STEP}0"]
    ops = {}
    classify(steps, ops=ops)
    for group in LAYER_GROUPS:
        names = {name for cat, name in ops if cat == group}
        assert any("Backward" in n for n in names), (group, names)
        assert any(n in ("aten::convolution", "aten::linear", "aten::addmm", "aten::mkldnn_convolution") or
                   "conv" in n or "mm" in n for n in names), (group, names)  # fmt: skip
    assert any("Backward" in name for cat, name in ops if cat == "loss")
    assert not any("Backward" in name for cat, name in ops if cat == "other" and "AccumulateGrad" not in name)


def test_a_run_shorter_than_the_profile_writes_what_it_has(tmp_path, capsys):
    spec = AlexNetSpec(width=0.125, image_size=67)
    model = AlexNet(spec)
    loader = device_loader(make_synthetic(64, 10, 1, 28, seed=1), 8, 67, 0, torch.device("cpu"))
    prof = StepProfiler(5, model, placement(spec), tmp_path)
    with prof:
        train_steps(model, loader, 4, prof.after_step)
    assert "ended after 2 of 5 profiled steps" in capsys.readouterr().err
    assert json.loads((tmp_path / "profile" / "summary.json").read_text())["steps"] == 2


def test_a_failed_run_writes_no_profile(tmp_path):
    spec = AlexNetSpec(width=0.125, image_size=67)
    model = AlexNet(spec)
    loader = device_loader(make_synthetic(64, 10, 1, 28, seed=1), 8, 67, 0, torch.device("cpu"))
    prof = StepProfiler(5, model, placement(spec), tmp_path)

    def failing_run():
        with prof:
            train_steps(model, loader, 3, prof.after_step)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing_run()
    assert not (tmp_path / "profile").exists()
    assert all(not m._forward_hooks for m in model.modules())


def test_off_by_default_costs_nothing(tmp_path):
    spec = AlexNetSpec(width=0.125, image_size=67)
    model = AlexNet(spec)
    prof = StepProfiler(0, model, placement(spec), tmp_path)
    with prof:
        for _ in range(4):
            prof.after_step()
    assert prof.prof is None and not (tmp_path / "profile").exists()
