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


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_micro_batches_in_flight(tmp_path, schedule):
    """From the schedule's own actions: GPipe holds all M micro-batches' activations at once on
    every stage, 1F1B never more than S (S = 2, M = 8)."""
    results = spawn(w.exactness, 2, tmp_path, 2, 1, schedule, 8)
    for res in results:
        kinds = [k for k, _ in res["actions"]]
        assert kinds.count("F") == kinds.count("B") == 8
        if schedule == "gpipe":
            assert res["max_in_flight"] == 8 and kinds == ["F"] * 8 + ["B"] * 8
        else:
            assert res["max_in_flight"] <= 2


def test_stages_train_like_the_reference_and_replicas_agree(tmp_path):
    """2 replicas x 2 stages, 3 SGD steps (momentum): the gathered weights equal the reference
    trained on the same global batches; a stage's replicas are bitwise equal.  Catches a stage
    averaged with a different stage, micro-batch losses summed, a stage that does not step."""
    results = spawn(w.train_steps, 4, tmp_path, 2, 1, "1f1b", 2)
    assert results[0]["local"].keys() != results[1]["local"].keys()  # stages hold different layers
    for a, b in ((0, 2), (1, 3)):
        assert all(torch.equal(results[a]["local"][k], results[b]["local"][k]) for k in results[a]["local"])
    ref = w.reference(1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for s in range(3):
        w.at_step(ref, s)
        x, y = w.batch(seed=10 + s)
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    for res in results:
        for name, value in ref.state_dict().items():
            assert rel_err(res["full"][name], value) <= 1e-5, name
    # Each replica's loss is over its own rows; their mean is the global batch's.
    for s in range(3):
        mean = (results[0]["losses"][s] + results[2]["losses"][s]) / 2
        assert abs(mean - losses[s]) <= 1e-5 * abs(losses[s])
