#!/usr/bin/env python
"""The pipeline's bubble, measured: each stage's idle fraction per step from the schedule's
own per-action timestamps, beside the theory (S-1)/(M+S-1); the micro-batches in flight per
stage (GPipe against 1F1B); the bytes each stage sends per step at the boundaries.

    python bench/pipeline_bubble.py [--stages 2] [--microbatches 1 2 4 8] [--batch 64]
                                    [--width 0.25] [--image-size 67] [--steps 6] [--out OUT]

S gloo processes on the CPU, one thread each (so the stages do not share cores' threads),
the d2l network at ``--width`` on ``--image-size`` inputs, cut by FLOPs.  A stage's idle time
is the step's wall time less its forward and backward actions: waiting for a neighbour (the
bubble) and the boundary transfers.  The theory assumes equal stages and free links; a cut
by FLOPs is not equal in time, so the measured figures are higher on the slower stage's
neighbour.  Prints a table and writes JSON (default: bench/results/pipeline_bubble.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distalex.model.alexnet import AlexNetSpec
from distalex.model.flops import layer_counts
from distalex.parallel.mesh import Mesh, process_groups
from distalex.parallel.pipeline import bubble_theory
from distalex.parallel.placement import placement_for

WARMUP = 2


def _worker(rank, stages, args, schedule, microbatches, store, out):
    torch.set_num_threads(1)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    timeout = timedelta(seconds=300)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=stages, timeout=timeout)
    spec = AlexNetSpec(width=args.width, image_size=args.image_size)
    cfg = SimpleNamespace(stages=stages, microbatches=microbatches, schedule=schedule, boundaries=[])
    layers = [(c.name, c.macs) for c in layer_counts(spec)]
    mesh = Mesh.plan("pipeline", stages, 1, args.batch, "no", False, pipeline=cfg, layers=layers)
    p = placement_for("pipeline", mesh, rank, torch.device("cpu"), spec, global_batch=args.batch)
    p.stage_group, p.replica_group = process_groups(mesh, timeout)
    module = p.build_model("xavier", seed=0)
    model = p.wrap(module, accelerator=None)
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    idle, walls, in_flight = [], [], 0
    for step in range(WARMUP + args.steps):
        p.exchange_stats.pop()
        p.forward_backward(model, x, y, step, contextlib.nullcontext, None)
        opt.step()
        opt.zero_grad()
        if step >= WARMUP:
            trace = p.last_trace
            idle.append(trace.idle_fraction)
            walls.append(trace.wall)
            in_flight = max(in_flight, trace.max_in_flight)
    row = {
        "schedule": schedule,
        "stages": stages,
        "microbatches": microbatches,
        "stage": p.stage,
        "layers": f"{p.layers()[0]}..{p.layers()[-1]}",
        "idle_fraction": sum(idle) / len(idle),
        "theory": bubble_theory(stages, microbatches),
        "step_s": sum(walls) / len(walls),
        "max_in_flight": in_flight,
        "bytes_per_step": p.exchange_stats.pop(),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=67)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline_bubble.json"))
    args = ap.parse_args()
    rows = []
    for schedule in ("gpipe", "1f1b"):
        for m in args.microbatches:
            if schedule == "1f1b" and m < args.stages:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_worker, args=(args.stages, args, schedule, m, f"{tmp}/store", tmp), nprocs=args.stages)
                rows += [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.stages)]
    head = f"{'schedule':8} {'M':>3} {'stage':>5} {'layers':16} {'idle':>6} {'theory':>6} {'step ms':>8} {'in flight':>9} {'bytes/step':>11}"
    print(head)
    for r in rows:
        print(
            f"{r['schedule']:8} {r['microbatches']:>3} {r['stage']:>5} {r['layers']:16} {r['idle_fraction']:6.3f} "
            f"{r['theory']:6.3f} {1000 * r['step_s']:8.1f} {r['max_in_flight']:>9} {r['bytes_per_step']:>11}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
