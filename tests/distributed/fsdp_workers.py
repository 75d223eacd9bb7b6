"""Worker bodies for the fsdp gloo process tests (spawned, one process per rank)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distalex.model.alexnet import AlexNet, AlexNetSpec, init_weights
from distalex.parallel.mesh import Mesh, process_groups
from distalex.parallel.placement import Placement, local_part, placement_for

SPEC = dict(width=0.125, image_size=67, dropout=0.0, lrn=True)
GLOBAL_BATCH = 8


def _placement(rank: int, world: int, towers: int, store_path: str, unit: str = "layer") -> Placement:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a GPU is visible
    timeout = timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world, timeout=timeout)
    spec = AlexNetSpec(towers=towers, **SPEC)
    mesh = Mesh.plan("fsdp", world, towers, GLOBAL_BATCH, "no", cuda=False)
    placement = placement_for("fsdp", mesh, rank, torch.device("cpu"), spec, global_batch=GLOBAL_BATCH)
    placement.unit = unit
    placement.tower_group, placement.replica_group = process_groups(mesh, timeout)
    return placement


def batch(n=GLOBAL_BATCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 67, 67, generator=g), torch.randint(0, 10, (n,), generator=g)


def reference(towers: int) -> AlexNet:
    torch.manual_seed(0)
    net = AlexNet(AlexNetSpec(towers=towers, **SPEC))
    init_weights(net, "xavier")
    return net


def exactness(rank, world, towers, store_path, out_dir, unit="layer"):
    """Forward and gradients of the sharded model vs the reference on the same weights and global
    batch (rank r its r-th rows), one SGD step, and evaluation through the inference model on
    shares of different sizes."""
    placement = _placement(rank, world, towers, store_path, unit)
    model = placement.wrap(placement.build_model("xavier", seed=0), accelerator=None)
    x, y = batch()
    local = x.shape[0] // world
    rows = slice(rank * local, (rank + 1) * local)
    logits = model(x[rows])
    F.cross_entropy(logits, y[rows]).backward()
    grads = placement.full_tensors({n: p.grad for n, p in model.named_parameters()})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    memory = placement.memory_bytes(model, opt)
    weights = placement.full_tensors(dict(model.state_dict()))
    local_elements = sum(local_part(p).numel() for p in model.parameters())
    # evaluation: uneven shares (rank 0 one row more), the gathered reference model
    ex, _ = batch(n=2 * world + 1, seed=2)
    start = 0 if rank == 0 else 2 * rank + 1
    stop = 3 if rank == 0 else start + 2
    with torch.no_grad():
        eval_logits = placement.inference_model(model).eval()(ex[start:stop])
    # a checkpoint's tensors back into the shards: the same weights
    placement_tensors = placement.local_tensors(weights)
    model.load_state_dict(placement_tensors)
    reloaded = placement.full_tensors(dict(model.state_dict()))
    torch.save(
        {
            "logits": logits.detach(),
            "grads": grads,
            "weights": weights,
            "reloaded": reloaded,
            "memory": memory,
            "local_elements": local_elements,
            "comm": placement.comm_summary(),
            "eval_rows": (start, stop),
            "eval_logits": eval_logits,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()
