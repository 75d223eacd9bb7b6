"""The pipeline through the real CLI: the same losses as single step for step (dropout on,
across an epoch boundary), the boundary bytes in metrics.jsonl, portable checkpoints."""

import pytest
import torch

from distalex.config import load_config
from distalex.model.alexnet import spec_from_config
from distalex.model.flops import layer_counts
from distalex.parallel.comm import pipeline_bytes_per_step
from distalex.parallel.pipeline import cut_stages
from distalex.training.checkpoint import read

from helpers import (
    EXACT,
    EXACT_STEPS,
    TINY,
    assert_same_losses,
    latest_checkpoint,
    metrics,
    run_cli,
    shared_run,
    summary,
)

PIPE = ["--split-mode", "pipeline"]
RUNS = {
    "gpipe_m1": (2, [*PIPE, "pipeline.schedule=gpipe", "pipeline.microbatches=1"]),
    "gpipe_m4": (2, [*PIPE, "pipeline.schedule=gpipe", "pipeline.microbatches=4"]),
    "1f1b_m4": (2, [*PIPE, "pipeline.schedule=1f1b", "pipeline.microbatches=4"]),
    "2x2": (4, [*PIPE, "pipeline.stages=2", "pipeline.schedule=1f1b", "pipeline.microbatches=4"]),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return shared_run(tmp_path_factory, *EXACT, "--split-mode", "single")  # shared with test_placements


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {name: shared_run(tmp_path_factory, *EXACT, *args, nprocs=n) for name, (n, args) in RUNS.items()}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_pipeline_follows_single(single, runs, name):
    assert_same_losses(single, runs[name])
    s = summary(runs[name])
    world = RUNS[name][0]
    assert (s["split_mode"], s["world_size"], s["replicas"], s["pipeline_stages"]) == ("pipeline", world, world // 2, 2)
    assert s["epochs"] > 1 and s["test_acc"] == pytest.approx(summary(single)["test_acc"], abs=1 / 256)
    wa, wb = read(latest_checkpoint(single))["model"], read(latest_checkpoint(runs[name]))["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), (name, k)


def test_boundary_bytes_are_the_shape_arithmetic(runs):
    """metrics.jsonl's pipeline_bytes_per_step (rank 0 = stage 0 of replica 0: its activations
    forward) equals the formula; DDP's bytes appear only with replicas."""
    cfg = load_config(TINY, [o for o in EXACT if "=" in o], split_mode="pipeline")
    spec = spec_from_config(cfg)
    for name, replicas in (("1f1b_m4", 1), ("2x2", 2)):
        rows = [r for r in metrics(runs[name]) if "pipeline_bytes_per_step" in r]
        assert len(rows) == EXACT_STEPS
        cuts = cut_stages([(c.name, c.macs) for c in layer_counts(spec)], 2, None)  # balanced by FLOPs
        expected = sum(pipeline_bytes_per_step(spec, cuts, 0, cfg.train.batch_size // replicas).values())
        assert all(r["pipeline_bytes_per_step"] == expected for r in rows)
        assert all(("ddp_bytes_per_step" in r) == (replicas > 1) for r in rows)


def test_checkpoints_round_trip_through_the_pipeline(runs, tmp_path):
    """pipeline -> single -> pipeline 2x2 -> hybrid -> pipeline: weights and momentum bitwise."""
    start = latest_checkpoint(runs["1f1b_m4"])
    hops = [
        (1, ["--split-mode", "single"]),
        (4, [*PIPE, "pipeline.stages=2"]),
        (2, ["--split-mode", "hybrid"]),
        (2, [*PIPE, "pipeline.schedule=gpipe"]),
    ]
    ckpt = start
    for i, (nprocs, args) in enumerate(hops):
        out = tmp_path / f"hop{i}"
        run_cli(*EXACT, *args, f"train.resume={ckpt}", f"train.output_dir={out}", nprocs=nprocs)
        ckpt = latest_checkpoint(out)
    first, last = read(start), read(ckpt)
    assert all(torch.equal(first["model"][k], last["model"][k]) for k in first["model"])
    assert all(torch.equal(first["momentum"][k], last["momentum"][k]) for k in first["momentum"])
