"""Worker bodies for the pipeline's gloo process tests (spawned, one process per rank)."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from distalex.model.alexnet import AlexNet, AlexNetSpec, init_weights
from distalex.model.dropout import KeyedDropout
from distalex.model.flops import layer_counts
from distalex.parallel.mesh import Mesh, process_groups
from distalex.parallel.placement import placement_for

SPEC = dict(width=0.125, image_size=67, dropout=0.5, lrn=True)
GLOBAL_BATCH = 8
SEED = 0


def spec(towers: int) -> AlexNetSpec:
    return AlexNetSpec(towers=towers, **SPEC)


def placement(rank, world, stages, towers, schedule, microbatches, store_path, boundaries=()):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    timeout = timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world, timeout=timeout)
    cfg = SimpleNamespace(stages=stages, microbatches=microbatches, schedule=schedule, boundaries=list(boundaries))
    layers = [(c.name, c.macs) for c in layer_counts(spec(towers))]
    mesh = Mesh.plan("pipeline", world, towers, GLOBAL_BATCH, "no", False, pipeline=cfg, layers=layers)
    p = placement_for("pipeline", mesh, rank, torch.device("cpu"), spec(towers), global_batch=GLOBAL_BATCH)
    p.stage_group, p.replica_group = process_groups(mesh, timeout)
    return p


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(GLOBAL_BATCH, 1, 67, 67, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def rows(p, t):
    n = GLOBAL_BATCH // p.mesh.replicas
    return t[p.replica * n : (p.replica + 1) * n]


def exactness(rank, world, stages, towers, schedule, microbatches, store_path, out_dir, channels_last=False):
    """One step's forward and every gradient on this stage (gathered to reference shape)."""
    p = placement(rank, world, stages, towers, schedule, microbatches, store_path)
    module = p.build_model("xavier", seed=SEED)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(memory_format=fmt)
    model = p.wrap(module, accelerator=None)
    x, y = batch()
    loss, logits = p.forward_backward(model, rows(p, x).contiguous(memory_format=fmt), rows(p, y), 3,
                                      contextlib.nullcontext, None)  # fmt: skip
    grads = p.full_tensors({n: q.grad for n, q in module.named_parameters()})
    trace = p.last_trace
    torch.save(
        {
            "loss": loss, "logits": logits, "grads": grads, "bytes": p.exchange_stats.bytes_sent,
            "max_in_flight": trace.max_in_flight, "actions": [(a.kind, a.microbatch) for a in trace.actions],
            "stage": p.stage, "replica": p.replica, "cuts": p.mesh.cuts,
        },
        f"{out_dir}/rank{rank}.pt",
    )  # fmt: skip
    dist.destroy_process_group()


def train_steps(rank, world, stages, towers, schedule, microbatches, store_path, out_dir, steps=3):
    """A few SGD steps through the placement; every rank saves the gathered reference weights
    and its own stage's local weights."""
    p = placement(rank, world, stages, towers, schedule, microbatches, store_path)
    module = p.build_model("xavier", seed=SEED)
    model = p.wrap(module, accelerator=None)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for s in range(steps):
        x, y = batch(seed=10 + s)
        loss, _ = p.forward_backward(model, rows(p, x), rows(p, y), s, contextlib.nullcontext, None)
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    local = {k: v.clone() for k, v in module.state_dict().items()}
    full = p.full_tensors(dict(module.state_dict()))
    torch.save({"local": local, "full": full, "losses": losses}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def reference(towers: int) -> AlexNet:
    torch.manual_seed(SEED)
    net = AlexNet(spec(towers))
    init_weights(net, "xavier")
    return net


def at_step(net, step: int) -> None:
    for m in net.modules():
        if isinstance(m, KeyedDropout):
            m.at_step(SEED, step)
