#!/usr/bin/env python
"""Bytes each process sends per training step in every split mode, and a
projected scaling table built from them.

    python launch/comm_bytes.py [--config PATH] [--step-time S | --from-run RUN_DIR] [--json OUT] [key=value ...]

Table 1 (arithmetic from the layer shapes, fp32, ring accounting - the same
figures the exchanges count as they run, which the tests compare): for W = 2,
4, 8, 16 processes, ddp (W replicas), model-parallel (2 towers x W/2
replicas: the two-tower network), hybrid (W fc shards, the experiment's
network), pipeline (2 stages x W/2 replicas) and fsdp (W shards, one unit per layer).
A memory table follows: what each process holds of parameters, gradients and momentum.

Table 2 is a MODEL, not a measurement:

    T_W = T_1 / W + S_W / beta        efficiency = T_1 / (W * T_W)

T_1 is a measured single-device step time (``--from-run``: a finished
``single`` run's summary.json, T_1 = global batch / examples_per_sec; or
``--step-time``; by default d2l's published V100 figure for the d2l experiment
(4107 examples/s at batch 128), S_W the bytes one process sends per
step (table 1) and beta one process's link bandwidth in one direction. It
assumes the arithmetic divides perfectly over the W processes, no overlap of
communication with computation, no latency, and each process a link of its own
at the full bandwidth.  The model-parallel rows reuse the one-tower network's
T_1 (the two-tower network computes less, so those rows are pessimistic).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from distalex.config import load_config
from distalex.model.alexnet import AlexNet, count_parameters, spec_from_config
from distalex.model.flops import layer_counts
from distalex.parallel import hybrid
from distalex.parallel.comm import (
    ddp_bytes_per_step,
    fsdp_bytes_per_step,
    fsdp_shard_elements,
    hybrid_bytes_per_step,
    pipeline_bytes_per_step,
    tower_bytes_per_step,
)
from distalex.parallel.pipeline import cut_stages, reference_children, stage_layers
from distalex.parallel.placement import fsdp_units

WORLD_SIZES = (2, 4, 8, 16)
# One direction, per process.  NVLink 4 (H100 SXM): 900 GB/s both directions;
# PCIe 4.0 x16: 31.5 GB/s; InfiniBand 100 Gb/s (EDR): 12.5 GB/s.
LINKS = {"NVLink 4": 450e9, "PCIe 4.0 x16": 31.5e9, "InfiniBand 100 Gb/s": 12.5e9}
# d2l's published figure for the d2l experiment on one V100 (the lowest of its runs).
D2L_V100_EXAMPLES_PER_SEC = 4107.0


def bytes_table(cfg) -> list[dict]:
    """Bytes one process sends per step, for every split mode at W = 2..16."""
    batch = cfg.train.batch_size
    base = spec_from_config(cfg)
    two_towers = dataclasses.replace(base, towers=2)
    rows = []
    for world in WORLD_SIZES:
        ddp = ddp_bytes_per_step(count_parameters(AlexNet(base)), world)
        rows.append(_row("ddp", world, f"{world} x1", 0, ddp))
        replicas = world // 2
        tower = sum(tower_bytes_per_step(two_towers, batch // replicas).values())
        mp_ddp = ddp_bytes_per_step(count_parameters(AlexNet(two_towers)) // 2, replicas) if replicas > 1 else 0
        rows.append(_row("model-parallel", world, f"{replicas} x2", tower, mp_ddp))
        if base.fc_units % world == 0 and batch % world == 0:
            exchange = sum(hybrid_bytes_per_step(base, world, batch).values())
            conv = ddp_bytes_per_step(hybrid.replicated_parameters(base), world)
            rows.append(_row("hybrid", world, f"{world} shards", exchange, conv))
        rows.append(_pipeline_row(base, world, batch))
        rows.append(_fsdp_row(base, world))
    return rows


def _fsdp_row(spec, world: int) -> dict:
    """W shards, one unit per layer, parameters freed after the forward (the defaults)."""
    shapes = [[tuple(p.shape) for p in u.parameters()] for u in fsdp_units(AlexNet(spec), "layer")]
    return _row("fsdp", world, f"{world} shards", sum(fsdp_bytes_per_step(shapes, world, True).values()), 0)


def memory_table(cfg) -> list[dict]:
    """Bytes of parameters (= gradients = SGD momentum, all fp32) each process holds, per split
    mode at W = 2, 4, 8: the largest process's, from the tensors each placement builds
    (the figures a run logs as param_bytes, grad_bytes, optimizer_bytes)."""
    base = spec_from_config(cfg)
    two_towers = dataclasses.replace(base, towers=2)
    whole = count_parameters(AlexNet(base))
    params = dict(AlexNet(base).named_parameters())
    out = []
    for world in WORLD_SIZES[:3]:
        tower_params = dict(AlexNet(two_towers).named_parameters())
        tower = sum(p.numel() // 2 if n != "fc8.bias" else p.numel() for n, p in tower_params.items())
        held = {"single": whole, "ddp": whole, "model-parallel": tower}
        if base.fc_units % world == 0:
            held["hybrid"] = sum(
                p.numel() if hybrid.is_replicated(n) else p.numel() // world for n, p in params.items()
            )
        cuts = cut_stages([(c.name, c.macs) for c in layer_counts(base)], 2, None)
        held["pipeline"] = max(
            sum(
                p.numel()
                for n, p in params.items()
                if n.split(".")[0] in stage_layers(reference_children(base), cuts, k)
            )
            for k in range(2)
        )
        held["fsdp"] = sum(fsdp_shard_elements(tuple(p.shape), world) for p in params.values())
        for mode, n in held.items():
            out.append(
                {"split_mode": mode, "world_size": world, "param_bytes": 4 * n, "param_grad_momentum_bytes": 12 * n}
            )
    return out


def _pipeline_row(spec, world: int, batch: int, stages: int = 2) -> dict:
    """2 stages x W/2 replicas, cut by FLOPs: the busier stage's figures (stage boundaries
    send the same tensor each way, so both stages send the same bytes)."""
    replicas = world // stages
    cuts = cut_stages([(c.name, c.macs) for c in layer_counts(spec)], stages, None)
    exchange = max(sum(pipeline_bytes_per_step(spec, cuts, k, batch // replicas).values()) for k in range(stages))
    params = dict(AlexNet(spec).named_parameters())
    children = reference_children(spec)
    held = [
        sum(p.numel() for n, p in params.items() if n.split(".")[0] in stage_layers(children, cuts, k))
        for k in range(stages)
    ]
    allreduce = ddp_bytes_per_step(max(held), replicas) if replicas > 1 else 0
    return _row("pipeline", world, f"{replicas} x{stages}", exchange, allreduce)


def _row(mode: str, world: int, layout: str, exchange: int, allreduce: int) -> dict:
    return {
        "split_mode": mode,
        "world_size": world,
        "layout": layout,
        "exchange_bytes": exchange,
        "ddp_allreduce_bytes": allreduce,
        "total_bytes": exchange + allreduce,
    }


def projected_step_time(t1: float, world: int, bytes_sent: float, bandwidth: float) -> float:
    """The model's step time: T_1 / W + S_W / beta (see the module docstring)."""
    return t1 / world + bytes_sent / bandwidth


def scaling_table(rows: list[dict], t1: float, links: dict = LINKS) -> list[dict]:
    out = []
    for link, bandwidth in links.items():
        for r in rows:
            t = projected_step_time(t1, r["world_size"], r["total_bytes"], bandwidth)
            out.append(
                {
                    "link": link,
                    "split_mode": r["split_mode"],
                    "world_size": r["world_size"],
                    "step_time_s": t,
                    "speedup": t1 / t,
                    "efficiency": t1 / (r["world_size"] * t),
                }
            )
    return out


def single_step_time(args, batch: int) -> tuple[float, str]:
    if args.step_time is not None:
        return args.step_time, f"--step-time {args.step_time}"
    if args.from_run is not None:
        summary = json.loads((Path(args.from_run) / "summary.json").read_text())
        b = summary.get("global_batch", batch)
        return b / summary["examples_per_sec"], (
            f"measured: {args.from_run} ({summary.get('split_mode')}, {summary.get('device')}, "
            f"{summary['examples_per_sec']:.1f} examples/s at batch {b})"
        )
    return batch / D2L_V100_EXAMPLES_PER_SEC, (
        f"d2l's published V100 figure, {D2L_V100_EXAMPLES_PER_SEC:.0f} examples/s at batch {batch}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/d2l_fashion_mnist.yaml")
    parser.add_argument("--json", default=None, help="also write both tables here")
    parser.add_argument("--step-time", type=float, default=None, help="T_1: single-device step time, seconds")
    parser.add_argument("--from-run", default=None, help="T_1 from a finished single run's summary.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    batch = cfg.train.batch_size
    rows = bytes_table(cfg)
    print(
        f"{cfg.experiment}: {cfg.data.image_size}x{cfg.data.image_size}, global batch {batch}, fp32; "
        f"MB sent per process per step"
    )
    print(f"{'split mode':<15}{'W':>3}{'layout':>11}{'exchanges':>11}{'DDP all-reduce':>16}{'total':>9}")
    for r in rows:
        print(
            f"{r['split_mode']:<15}{r['world_size']:>3}{r['layout']:>11}{r['exchange_bytes'] / 1e6:>11.1f}"
            f"{r['ddp_allreduce_bytes'] / 1e6:>16.1f}{r['total_bytes'] / 1e6:>9.1f}"
        )
    memory = memory_table(cfg)
    print("\nMB held per process (the largest): parameters + gradients + SGD momentum, fp32")
    modes = list(dict.fromkeys(r["split_mode"] for r in memory))
    print(f"{'W':>3}" + "".join(f"{m:>16}" for m in modes))
    for world in WORLD_SIZES[:3]:
        cells = {r["split_mode"]: r for r in memory if r["world_size"] == world}
        line = f"{world:>3}"
        for m in modes:
            line += f"{cells[m]['param_grad_momentum_bytes'] / 1e6:>16.1f}" if m in cells else f"{'-':>16}"
        print(line)
    t1, source = single_step_time(args, batch)
    scaling = scaling_table(rows, t1)
    print(
        f"\nPROJECTED (a model, not a measurement): T_W = T_1/W + S_W/beta, efficiency = T_1/(W*T_W); "
        f"T_1 = {t1 * 1e3:.1f} ms ({source}); no overlap, no latency"
    )
    modes = list(dict.fromkeys(r["split_mode"] for r in rows))
    print(f"{'link':<21}{'W':>3}" + "".join(f"{m + ' ms':>20}{'eff':>6}" for m in modes))
    for link in LINKS:
        for world in WORLD_SIZES:
            cells = {s["split_mode"]: s for s in scaling if s["link"] == link and s["world_size"] == world}
            line = f"{link:<21}{world:>3}"
            for m in modes:
                s = cells.get(m)
                line += f"{s['step_time_s'] * 1e3:>20.2f}{s['efficiency']:>6.0%}" if s else f"{'-':>20}{'-':>6}"
            print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "bytes": rows,
                    "memory": memory,
                    "step_time_1_s": t1,
                    "step_time_source": source,
                    "projected": scaling,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
