#!/usr/bin/env python
"""Bytes each process sends per training step: the towers' activation exchanges
(model-parallel) beside DDP's gradient all-reduce, for one experiment's network.

    python launch/comm_bytes.py [--config PATH] [key=value ...]
"""

import argparse
import dataclasses
import json

from distalex.config import load_config
from distalex.model import AlexNet, count_parameters, spec_from_config
from distalex.towers import ddp_bytes_per_step, exchange_bytes_per_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/d2l_fashion_mnist.yaml")
    parser.add_argument("--json", default=None, help="also write the table here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    batch = cfg.train.batch_size
    rows = []
    for towers, replicas in ((1, 2), (1, 4), (2, 1), (2, 2), (4, 1)):
        # ddp rows replicate the experiment's own network; model-parallel rows split it into `towers`.
        base = spec_from_config(cfg)
        spec = dataclasses.replace(base, towers=towers) if towers > 1 else base
        params = count_parameters(AlexNet(spec))
        local = batch // replicas
        tower = sum(exchange_bytes_per_step(spec, local).values()) if towers > 1 else 0
        ddp = ddp_bytes_per_step(params // towers, replicas) if replicas > 1 else 0
        mode = "ddp" if towers == 1 else "model-parallel"
        rows.append(
            {
                "split_mode": mode,
                "replicas": replicas,
                "towers": towers,
                "world_size": replicas * towers,
                "tower_exchange_MB": tower / 1e6,
                "ddp_allreduce_MB": ddp / 1e6,
                "total_MB": (tower + ddp) / 1e6,
            }
        )
    print(
        f"{cfg.experiment}: {cfg.data.image_size}x{cfg.data.image_size}, global batch {batch}, fp32; "
        f"MB sent per process per step"
    )
    print(f"{'split mode':<15}{'W':>3}{'R x T':>7}{'tower exchange':>16}{'DDP all-reduce':>16}{'total':>10}")
    for r in rows:
        print(
            f"{r['split_mode']:<15}{r['world_size']:>3}{r['replicas']:>4} x{r['towers']:<2}"
            f"{r['tower_exchange_MB']:>16.1f}{r['ddp_allreduce_MB']:>16.1f}{r['total_MB']:>10.1f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
