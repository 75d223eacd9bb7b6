"""hybrid: exactness against the reference model (training and evaluation), fc
shards never averaged, and the bytes each exchange sends equal to the shape
arithmetic (gloo processes, file store)."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from distalex.parallel.comm import hybrid_bytes_per_step
from distalex.parallel.hybrid import shard_dim
from distalex.parallel.towers import shard_state_dict

import hybrid_workers as w


def spawn(fn, world, towers, tmp_path):
    mp.spawn(fn, args=(world, towers, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("world", "towers"), [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_forward_and_every_gradient_equal_reference(tmp_path, world, towers):
    results = spawn(w.exactness, world, towers, tmp_path)
    ref = w.reference(towers)
    x, y = w.batch()
    logits = ref(x)
    F.cross_entropy(logits, y).backward()
    local = x.shape[0] // world
    for rank, res in enumerate(results):
        assert res["logits"].shape[0] == local  # each rank gets the logits of its own rows only
        assert rel_err(res["logits"], logits[rank * local : (rank + 1) * local].detach()) <= 1e-5
    # Every gradient - conv ones after DDP's averaging, fc shards as computed - equals the reference's.
    for name, p in ref.named_parameters():
        for res in results:
            assert rel_err(res["grads"][name], p.grad) <= 1e-5, name
            assert torch.equal(res["weights"][name], p.detach())
    # Each rank's fc shard gradient is its slice of the reference gradient (no averaging across shards).
    for rank, res in enumerate(results):
        mine = shard_state_dict({n: p.grad for n, p in ref.named_parameters()}, rank, world, dim_of=shard_dim)
        for name, g in mine.items():
            assert rel_err(res["local_grads"][name], g) <= 1e-5, (rank, name)
    # Each rank sent exactly the bytes the shape arithmetic predicts (three exchanges, forward and backward).
    expected = sum(hybrid_bytes_per_step(ref.spec, world, x.shape[0]).values())
    assert expected > 0 and all(res["bytes"] == expected for res in results)
    # Evaluation: shares of different sizes per rank; the inference model (fc shards
    # gathered) gives every rank the reference's logits for its own rows.
    ref.eval()
    ex, _ = w.batch(n=11, seed=2)
    with torch.no_grad():
        expected_eval = ref(ex)
    sizes = [res["eval_rows"][1] - res["eval_rows"][0] for res in results]
    assert sum(sizes) == 11 and len(set(sizes)) > 1  # uneven, as a real evaluation's can be
    for res in results:
        start, stop = res["eval_rows"]
        assert rel_err(res["eval_logits"], expected_eval[start:stop]) <= 1e-5
        assert res["eval_bytes"] == 0  # no exchange runs (none would count as training traffic)


def test_fc_shards_never_averaged_replicated_parameters_agree(tmp_path):
    world = 4
    results = spawn(w.train_steps, world, 1, tmp_path)
    for name in results[0]:
        if shard_dim(name) is None:  # conv1..conv5 and fc8's bias: replicated, kept equal by DDP
            assert all(torch.equal(results[0][name], r[name]) for r in results[1:]), name
        else:  # fc shards: each rank its own units, never averaged with another's
            for a in range(world):
                for b in range(a + 1, world):
                    assert not torch.allclose(results[a][name], results[b][name]), (name, a, b)
    # And the trained shards are exactly the reference trained on the same global batches.
    ref = w.reference(1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for s in range(3):
        x, y = w.batch(seed=10 + s)
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
    for rank in range(world):
        expected = shard_state_dict(ref.state_dict(), rank, world, dim_of=shard_dim)
        for name, value in expected.items():
            assert rel_err(results[rank][name], value) <= 1e-5, (rank, name)
