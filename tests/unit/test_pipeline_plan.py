"""Pipeline planning (where to cut, what is refused, with the numbers) and the fp16 loss
scaling inside the schedule - no processes."""

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distalex.config import load_config
from distalex.errors import ConfigError
from distalex.model.alexnet import AlexNetSpec
from distalex.model.flops import layer_counts
from distalex.parallel import pipeline
from distalex.parallel.mesh import Mesh
from distalex.parallel.placement import _notices

SPEC = AlexNetSpec()  # the d2l network
LAYERS = [(c.name, c.macs) for c in layer_counts(SPEC)]


def plan(world, stages=None, microbatches=4, schedule="1f1b", boundaries=(), batch=128):
    cfg = SimpleNamespace(stages=stages, microbatches=microbatches, schedule=schedule, boundaries=list(boundaries))
    return Mesh.plan("pipeline", world, 1, batch, "no", False, pipeline=cfg, layers=LAYERS)


def test_balanced_cut_minimises_the_largest_stage():
    macs = [m for _, m in LAYERS]
    for stages in range(1, len(macs) + 1):
        starts = pipeline.balanced_starts(macs, stages)
        ends = [*starts[1:], len(macs)]
        worst = max(sum(macs[a:b]) for a, b in zip(starts, ends, strict=True))
        # No other cut into as many contiguous stages has a smaller largest stage (brute force).
        for inner in itertools.combinations(range(1, len(macs)), stages - 1):
            cut = [0, *inner, len(macs)]
            assert worst <= max(sum(macs[a:b]) for a, b in itertools.pairwise(cut))


def test_mesh_of_replicas_times_stages():
    mesh = plan(4, stages=2)
    assert (mesh.world_size, mesh.replicas, mesh.stages, mesh.microbatches, mesh.schedule) == (4, 2, 2, 4, "1f1b")
    assert mesh.cuts[0] == "conv1" and len(mesh.cuts) == 2


def test_boundaries_by_name():
    mesh = plan(3, boundaries=["conv3", "fc6"])
    assert mesh.cuts == ("conv1", "conv3", "fc6") and mesh.stages == 3 and mesh.replicas == 1
    layers = pipeline.stage_layers(pipeline.reference_children(SPEC), mesh.cuts, 1)
    assert layers == ["conv3", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5", "flatten"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(world=3, stages=2), "W=3 processes, S=2 stages, 3 % 2 = 1"),
        (dict(world=2, microbatches=3), "M=3 micro-batches do not divide each replica's 128 rows"),
        (dict(world=4, stages=2, microbatches=5, batch=96), "48 rows (global batch 96 / 2 replicas; 48 % 5 = 3)"),
        (dict(world=4, microbatches=2), "pipeline.schedule=1f1b needs at least one micro-batch per stage: M=2 < S=4"),
        (dict(world=9), "S=9 stages is not in [1, 8]"),
        (dict(world=2, boundaries=["pool2"]), "['pool2'] are not weight layers a stage can start at"),
        (dict(world=3, stages=3, boundaries=["fc6"]), "1 boundaries ['fc6'] cut 2 stages, but S=3 stages need 2"),
        (dict(world=3, boundaries=["fc6", "conv3"]), "must be distinct and in the network's order"),
    ],
)
def test_impossible_pipelines_are_refused_with_the_numbers(kwargs, message):
    with pytest.raises(ConfigError) as err:
        plan(**kwargs)
    assert message in str(err.value)


def test_config_keys():
    cfg = load_config(None, ["pipeline.stages=2", "pipeline.boundaries=[conv3]"], split_mode="pipeline")
    assert (cfg.pipeline.stages, list(cfg.pipeline.boundaries), cfg.pipeline.schedule) == (2, ["conv3"], "1f1b")
    with pytest.raises(ConfigError, match="pipeline.schedule"):
        load_config(None, ["pipeline.schedule=zigzag"], split_mode="pipeline")
    with pytest.raises(ConfigError, match="pipeline.microbatches"):
        load_config(None, ["pipeline.microbatches=0"], split_mode="pipeline")


def test_one_process_falls_back_to_single_with_a_notice():
    mesh = plan(1)
    assert mesh == Mesh(1, 1, 1)
    notices = _notices("pipeline", mesh, SPEC, SimpleNamespace(comm_hook="none"), "cpu")
    assert notices == ["pipeline with 1 process: single-device fallback, the whole model on cpu"]


def test_bubble_theory():
    assert pipeline.bubble_theory(2, 1) == 0.5 and pipeline.bubble_theory(2, 4) == 0.2
    assert pipeline.bubble_theory(4, 4) == 3 / 7


def test_fp16_loss_is_scaled_inside_the_schedule_and_unscaled_for_the_figures():
    """The last stage backpropagates scale x loss; the optimizer step's unscale gives the
    gradients of the unscaled loss; the reported loss is unscaled."""
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w = torch.randn(10, 10, generator=g, requires_grad=True)
    loss_fn = pipeline.scaled_cross_entropy(scaler)
    losses = [loss_fn(logits[i : i + 4] @ w, target[i : i + 4]) for i in (0, 4)]
    (sum(losses) / 2).backward()  # what scale_grads does: the micro-batches' mean
    plain = F.cross_entropy(logits @ w, target)
    assert torch.allclose(pipeline.step_loss(losses, scaler), plain.detach())
    scaled_grad = w.grad.clone()
    w.grad = None
    plain.backward()
    assert torch.allclose(scaled_grad / 1024.0, w.grad, rtol=1e-5)
    assert torch.allclose(pipeline.step_loss(losses, None), plain.detach() * 1024.0)  # without the scaler: scaled
