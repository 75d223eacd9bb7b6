"""Worker bodies for the gloo process tests (spawned, one process per rank)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distalex.model.alexnet import AlexNet, AlexNetSpec, init_weights
from distalex.parallel.mesh import Mesh, process_groups
from distalex.parallel.placement import Placement, placement_for
from distalex.parallel.towers import shard_state_dict

SPEC = dict(width=0.125, image_size=67, dropout=0.0, lrn=True)


def _placement(rank: int, world: int, towers: int, store_path: str, timeout_s: float = 120) -> Placement:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a GPU is visible
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world, timeout=timeout)
    mesh = Mesh.plan("model-parallel", world, towers, global_batch=8, mixed_precision="no", cuda=False)
    placement = placement_for("model-parallel", mesh, rank, torch.device("cpu"), AlexNetSpec(towers=towers, **SPEC))
    placement.tower_group, placement.replica_group = process_groups(mesh, timeout)
    return placement


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 67, 67, generator=g), torch.randint(0, 10, (n,), generator=g)


def exactness(rank, world, towers, store_path, out_dir, channels_last=False):
    """Tower-parallel forward and gradients vs the reference on the same weights and batch.
    Replica r takes the r-th slice of the global batch, as in training.  ``channels_last``:
    model and batch in that memory format (as train.channels_last does); the layouts that
    reach conv3 (after the exchange) and leave the exchange's backward are recorded."""
    placement = _placement(rank, world, towers, store_path)
    tower = placement.build_model("xavier", seed=0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tower = tower.to(memory_format=fmt)
    layouts = {}

    # What leaves the exchange forward (conv3's input) and backward (the gradient of pool2's output).
    def watch_pool2_grad(module, args, out):
        out.register_hook(lambda g: _save(layouts, "pool2_grad", g))

    tower.conv3.register_forward_pre_hook(lambda m, args: _save(layouts, "conv3_input", args[0]))
    tower.pool2.register_forward_hook(watch_pool2_grad)
    model = placement.wrap(tower, accelerator=None)
    x, y = batch()
    local = x.shape[0] // placement.mesh.replicas
    sl = slice(placement.replica * local, (placement.replica + 1) * local)
    logits = model(x[sl].contiguous(memory_format=fmt))
    F.cross_entropy(logits, y[sl]).backward()
    grads = placement.full_tensors({n: p.grad for n, p in tower.named_parameters()})
    weights = placement.full_tensors(dict(tower.state_dict()))
    torch.save(
        {
            "logits": logits.detach(),
            "grads": grads,
            "weights": weights,
            "bytes": tower.stats.bytes_sent,
            "layouts": layouts,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def _save(layouts: dict, name: str, t: torch.Tensor) -> None:
    layouts[name] = t.is_contiguous(memory_format=torch.channels_last)


def train_steps(rank, world, towers, store_path, out_dir, steps=3):
    """A few SGD steps with DDP over each tower's replicas; save this rank's local weights."""
    placement = _placement(rank, world, towers, store_path)
    tower = placement.build_model("xavier", seed=0)
    model = placement.wrap(tower, accelerator=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for s in range(steps):
        x, y = batch(seed=10 + s)
        local = x.shape[0] // placement.mesh.replicas
        sl = slice(placement.replica * local, (placement.replica + 1) * local)
        F.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()
        opt.zero_grad()
    torch.save({k: v.clone() for k, v in tower.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def fp16_overflow_on_one_rank(rank, world, towers, store_path, out_dir, victim=None):
    """Two steps with a CPU gradient scaler (scale 1024) through distalex.runtime.precision.optimizer_step.
    Step 1: an overflow (inf) in one rank's gradients only, after DDP's all-reduce, so no
    other rank sees it.  Step 2: clean.  Saves the weights after each step and the scales."""
    from distalex.runtime.precision import optimizer_step

    victim = world - 1 if victim is None else victim
    placement = _placement(rank, world, towers, store_path)
    tower = placement.build_model("xavier", seed=0)
    model = placement.wrap(tower, accelerator=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    out = {"weights": [], "scales": [scaler.get_scale()]}
    for s in range(2):
        x, y = batch(seed=10 + s)
        local = x.shape[0] // placement.mesh.replicas
        sl = slice(placement.replica * local, (placement.replica + 1) * local)
        scaler.scale(F.cross_entropy(model(x[sl]), y[sl])).backward()
        if s == 0 and rank == victim:
            next(iter(tower.parameters())).grad.view(-1)[0] = float("inf")
        optimizer_step(opt, scaler)
        opt.zero_grad()
        out["weights"].append(placement.full_tensors(dict(tower.state_dict())))
        out["scales"].append(scaler.get_scale())
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def reference(towers: int):
    torch.manual_seed(0)
    net = AlexNet(AlexNetSpec(towers=towers, **SPEC))
    init_weights(net, "xavier")
    return net


__all__ = ["exactness", "train_steps", "fp16_overflow_on_one_rank", "reference", "batch", "shard_state_dict"]
