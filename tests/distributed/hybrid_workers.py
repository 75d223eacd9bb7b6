"""Worker bodies for the hybrid gloo process tests (spawned, one process per rank)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distalex.model.alexnet import AlexNet, AlexNetSpec, init_weights
from distalex.parallel.mesh import Mesh, process_groups
from distalex.parallel.placement import Placement, placement_for

SPEC = dict(width=0.125, image_size=67, dropout=0.0, lrn=True)
GLOBAL_BATCH = 8


def _placement(rank: int, world: int, towers: int, store_path: str) -> Placement:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a GPU is visible
    timeout = timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world, timeout=timeout)
    spec = AlexNetSpec(towers=towers, **SPEC)
    mesh = Mesh.plan("hybrid", world, towers, GLOBAL_BATCH, "no", cuda=False, fc_units=spec.fc_units)
    placement = placement_for("hybrid", mesh, rank, torch.device("cpu"), spec)
    placement.tower_group, placement.replica_group = process_groups(mesh, timeout)
    placement.shard_group = dist.new_group(list(range(world)), timeout=timeout)
    return placement


def batch(n=GLOBAL_BATCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 67, 67, generator=g), torch.randint(0, 10, (n,), generator=g)


def own_rows(placement: Placement, n: int) -> slice:
    local = n // placement.mesh.replicas
    return slice(placement.rank * local, (placement.rank + 1) * local)


def uneven_rows(rank: int, world: int, n: int) -> slice:
    """A share of n rows that differs in size between ranks (as evaluation's shares can)."""
    bounds = [0] + [min(n, (r + 1) * (n // world) + r % 2) for r in range(world - 1)] + [n]
    return slice(bounds[rank], bounds[rank + 1])


def exactness(rank, world, towers, store_path, out_dir):
    """Hybrid forward and gradients vs the reference on the same weights and global
    batch (rank r takes the r-th slice, as in training); then evaluation through
    the placement's inference model on shares of different sizes."""
    placement = _placement(rank, world, towers, store_path)
    model = placement.build_model("xavier", seed=0)
    wrapped = placement.wrap(model, accelerator=None)
    x, y = batch()
    rows = own_rows(placement, x.shape[0])
    logits = wrapped(x[rows])
    F.cross_entropy(logits, y[rows]).backward()
    sent = model.stats.pop()
    grads = placement.full_tensors({n: p.grad for n, p in model.named_parameters()})
    local_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = placement.full_tensors(dict(model.state_dict()))
    ex, _ = batch(n=11, seed=2)
    share = uneven_rows(rank, world, ex.shape[0])
    with torch.inference_mode():
        evaluated = placement.inference_model(model).eval()(ex[share])
    torch.save(
        {
            "logits": logits.detach(),
            "grads": grads,
            "local_grads": local_grads,
            "weights": weights,
            "bytes": sent,
            "eval_rows": (share.start, share.stop),
            "eval_logits": evaluated,
            "eval_bytes": model.stats.pop(),
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def train_steps(rank, world, towers, store_path, out_dir, steps=3):
    """A few SGD steps (momentum, weight decay); save this rank's local weights."""
    placement = _placement(rank, world, towers, store_path)
    model = placement.build_model("xavier", seed=0)
    wrapped = placement.wrap(model, accelerator=None)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for s in range(steps):
        x, y = batch(seed=10 + s)
        rows = own_rows(placement, x.shape[0])
        F.cross_entropy(wrapped(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def reference(towers: int):
    torch.manual_seed(0)
    net = AlexNet(AlexNetSpec(towers=towers, **SPEC))
    init_weights(net, "xavier")
    return net
