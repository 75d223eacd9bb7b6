"""The pipeline's exactness (forward and every gradient vs the reference, dropout on), its
stages never averaged with one another, and what its schedules hold in flight
(gloo processes, file store)."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from distalex.parallel.comm import pipeline_bytes_per_step

import pipeline_workers as w


def spawn(fn, world, tmp_path, *args):
    mp.spawn(fn, args=(world, *args, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference_step(towers, step=3):
    ref = w.reference(towers)
    w.at_step(ref, step)
    x, y = w.batch()
    logits = ref(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return ref, loss.detach(), logits.detach()


@pytest.mark.parametrize(
    ("world", "stages", "towers", "schedule", "microbatches"),
    [
        (2, 2, 1, "gpipe", 4),
        (2, 2, 2, "1f1b", 4),
        (4, 4, 1, "1f1b", 4),
        (4, 4, 2, "gpipe", 2),
        (4, 2, 1, "1f1b", 2),  # 2 replicas x 2 stages: DDP over each stage's replicas
    ],
)
def test_forward_and_every_gradient_equal_reference(tmp_path, world, stages, towers, schedule, microbatches):
    results = spawn(w.exactness, world, tmp_path, stages, towers, schedule, microbatches)
    ref, loss, logits = reference_step(towers)
    n = w.GLOBAL_BATCH // (world // stages)
    for res in results:
        r = res["replica"]
        sl = slice(r * n, (r + 1) * n)
        # Every stage returns the last stage's figures: the replica's rows' mean loss and logits.
        assert rel_err(res["logits"], logits[sl]) <= 1e-5
        expected_loss = F.cross_entropy(logits[sl], w.batch()[1][sl])
        assert abs(res["loss"] - expected_loss) <= 1e-5 * abs(expected_loss)
        for name, p in ref.named_parameters():
            assert rel_err(res["grads"][name], p.grad) <= 1e-5, (res["stage"], name)
        # Bytes sent at the boundaries, counted as they ran, are the shape arithmetic's.
        expected = sum(pipeline_bytes_per_step(ref.spec, res["cuts"], res["stage"], n).values())
        assert res["bytes"] == expected > 0
