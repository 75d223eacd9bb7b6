"""The loss guard across ranks: a non-finite loss on one replica stops every rank, and every rank
names the same step, the earliest one (real Trainer on gloo ranks, spawned)."""

import torch.multiprocessing as mp

from distalex.training.checkpoint import list_checkpoints, read

import trainer_workers as w
from helpers import free_port


def test_nan_loss_on_one_replica_stops_every_rank_at_that_step(tmp_path):
    world, nan_rank, nan_step = 2, 1, 2
    mp.spawn(w.nan_loss_on_one_rank, args=(world, free_port(), str(tmp_path), nan_rank, nan_step), nprocs=world)
    newest = list_checkpoints(str(tmp_path / "run"))[-1]
    assert read(newest)["position"]["step"] == nan_step - 1  # checkpoint_every=1: the step before
    expected = (
        f"NonFiniteLoss: loss is not finite at step {nan_step}; stopping. The newest checkpoint, {newest}, is kept."
    )

    outcomes = [(tmp_path / f"outcome{r}.txt").read_text() for r in range(world)]
    assert outcomes == [expected] * world


def test_a_refusal_found_on_one_rank_is_every_ranks_and_names_that_rank(tmp_path):
    """Rank 1 cannot read its resume checkpoint, rank 0 can start: both end with exit status 2
    at once (not after train.timeout_s), the main process with rank 1's reason and rank number."""
    world = 2
    mp.spawn(w.refusal_on_one_rank, args=(world, free_port(), str(tmp_path), 1), nprocs=world)
    main, other = [(tmp_path / f"outcome{r}.txt").read_text() for r in range(world)]
    assert other.startswith("CheckpointError 2 ") and "elsewhere" in other
    reason = other.removeprefix("CheckpointError 2 ")
    assert main == f"RefusedOnRank 2 {reason} (found on rank 1)"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
