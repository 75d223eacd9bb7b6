#!/usr/bin/env python
"""One node's launcher of a SLURM job: ``accelerate launch`` with the rendezvous
taken from the allocation (started once per node by launch/slurm.sbatch).

    python launch/slurm_node.py [--dry-run] [--config PATH] --split-mode MODE [key=value ...]

From the environment SLURM sets in every task:

  SLURM_JOB_NODELIST (or SLURM_NODELIST)  the nodes, e.g. gpu-[07-08]; the first is the rendezvous host
  SLURM_NNODES                            number of nodes (machines)
  SLURM_NODEID                            this node's index: accelerate's --machine_rank
  SLURM_JOB_ID                            the rendezvous port is 20000 + SLURM_JOB_ID % 20000
  SLURM_GPUS_ON_NODE                      processes per node (one per GPU)

Overrides: MASTER_ADDR, MASTER_PORT, DISTALEX_PROCS_PER_NODE (processes per
node; default SLURM_GPUS_ON_NODE, else the devices in CUDA_VISIBLE_DEVICES,
else 1), PYTHON (the interpreter), ACCELERATE_LAUNCH_ARGS (extra launcher
flags, e.g. --mixed_precision bf16).  Every argument is handed to
launch/train.py unchanged.  --dry-run prints the command instead of running
it.  A missing or inconsistent allocation: one line, exit status 2.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parent / "train.py"


class AllocationError(Exception):
    """The environment does not describe a SLURM allocation this script can use."""


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order: ``gpu-[07-08],cpu3``
    -> gpu-07, gpu-08, cpu3 (zero padding kept; several bracket groups per name allowed)."""
    hosts = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_item(item))
    if not hosts:
        raise AllocationError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise AllocationError(f"SLURM_JOB_NODELIST {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise AllocationError(f"SLURM_JOB_NODELIST {text!r}: unbalanced '['")
    items.append(current)
    return [i.strip() for i in items if i.strip()]


def _expand_item(item: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[: m.start()], item[m.end() :]
    out = []
    for part in m.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values = [str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise AllocationError(f"SLURM_JOB_NODELIST: cannot read the range {part!r} in {item!r}")
        out.extend(head + v + rest for v in values for rest in _expand_item(tail))
    return out


def _int(env: dict, key: str, minimum: int) -> int:
    value = env.get(key)
    if value is None or not value.strip().isdigit() or int(value) < minimum:
        raise AllocationError(
            f"{key}={value!r}: expected an integer >= {minimum} (is this running inside a SLURM job?)"
        )
    return int(value)


def procs_per_node(env: dict) -> int:
    for key in ("DISTALEX_PROCS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        if env.get(key):
            return _int(env, key, 1)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return len(visible) or 1


def render(env: dict, train_args: list[str]) -> list[str]:
    """This node's launcher command, from the allocation's environment."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise AllocationError("SLURM_JOB_NODELIST is not set (is this running inside a SLURM job?)")
    hosts = expand_nodelist(nodelist)
    nnodes = _int(env, "SLURM_NNODES", 1)
    node = _int(env, "SLURM_NODEID", 0)
    if nnodes != len(hosts):
        raise AllocationError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST {nodelist!r} names {len(hosts)} hosts")
    if node >= nnodes:
        raise AllocationError(f"SLURM_NODEID={node} is not below SLURM_NNODES={nnodes}")
    per_node = procs_per_node(env)
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT", 1)
    else:
        port = 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000
    return [
        env.get("PYTHON") or sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        str(nnodes),
        "--num_processes",
        str(nnodes * per_node),
        "--machine_rank",
        str(node),
        "--main_process_ip",
        env.get("MASTER_ADDR") or hosts[0],
        "--main_process_port",
        str(port),
        "--rdzv_backend",
        "static",
        "--same_network",
        "--mixed_precision",
        "no",  # distalex's train.mixed_precision decides (auto: bf16 where native)
        "--dynamo_backend",
        "no",
        *shlex.split(env.get("ACCELERATE_LAUNCH_ARGS", "")),
        str(TRAIN),
        *train_args,
    ]


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    try:
        cmd = render(dict(os.environ), args)
    except AllocationError as exc:
        print(f"slurm_node: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if dry:
        print(shlex.join(cmd), flush=True)
        return 0
    os.execvp(cmd[0], cmd)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
