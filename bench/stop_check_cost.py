#!/usr/bin/env python
"""Cost of the stop-flag check (one 1-element all-reduce over a gloo group), to size
``train.stop_check_every``: the check adds ``cost / N`` to every step.

    python bench/stop_check_cost.py [--procs 2 4] [--iters 2000] [--quick]

Starts N gloo processes on this machine (file store, no fixed port) and times
``all_reduce(MAX)`` of a 1-element CPU tensor, as
:meth:`distalex.parallel.placement.Placement.any_rank` does, after a warm-up.  Prints the
median and the 90th percentile in microseconds per process count, and the check
interval that keeps the overhead under 1 % of a step for a few step times.  On
one machine this is the loopback cost; across machines add the network's round
trips (a ring all-reduce of one element takes 2 (W - 1) hops).  Other load on
the machine inflates the figures: report the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store: str, iters: int, out: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    flag = torch.zeros(1, dtype=torch.int64)
    for _ in range(min(200, iters)):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    dist.barrier()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(times, fh)
    dist.destroy_process_group()


def measure(world: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), iters, out), nprocs=world, join=True)
        with open(out) as fh:
            times = sorted(json.load(fh))
    us = [t * 1e6 for t in times]
    return {"procs": world, "iters": iters, "median_us": statistics.median(us), "p90_us": us[int(0.9 * len(us))]}


def interval_for(cost_us: float, step_ms: float, overhead: float = 0.01) -> int:
    """Smallest N with cost / N <= overhead * step."""
    return max(1, math.ceil(cost_us / (overhead * step_ms * 1000)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="200 iterations, 2 processes (a smoke run)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    procs, iters = ([2], 200) if args.quick else (args.procs, args.iters)
    rows = [measure(w, iters) for w in procs]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"gloo all_reduce of one int64 on this machine ({os.cpu_count()} cores, load average {load:.2f}):")
    for r in rows:
        print(f"  {r['procs']} processes: median {r['median_us']:.0f} us, p90 {r['p90_us']:.0f} us")
    worst = max(r["p90_us"] for r in rows)
    print(f"check interval for < 1 % overhead at the p90 cost ({worst:.0f} us):")
    for step_ms in (3, 10, 50):
        print(f"  step of {step_ms} ms: every {interval_for(worst, step_ms)} steps")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "load_average": load}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
