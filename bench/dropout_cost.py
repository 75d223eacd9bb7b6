#!/usr/bin/env python
"""What placement-invariant dropout costs per training step, side by side with per-process
dropout, in one invocation (model.dropout_rng = placement_invariant vs process).

Both settings train the same network on the same batch; the rounds alternate (A B A B ...) so
that a change in the machine's load hits both.  Also times the mask draw alone (the whole
layer's [global batch, units] uniform draw, both dropout layers), which is the extra work.

    python bench/dropout_cost.py                    # d2l network, 224x224, batch 128
    python bench/dropout_cost.py --image-size 67 --width 0.125 --batch 64 --rounds 5

Prints a table and writes bench/results/dropout_cost.json.  Quote the ratio, not the times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distalex.model.alexnet import AlexNet, AlexNetSpec, init_weights
from distalex.model.dropout import KeyedDropout, global_keep_mask
from distalex.runtime.io import write_json
from distalex.telemetry.peak import cpu_model

ROOT = Path(__file__).resolve().parent.parent


def make(spec: AlexNetSpec, seed: int = 0):
    torch.manual_seed(seed)
    model = AlexNet(spec)
    init_weights(model, "xavier")
    model = model.to(memory_format=torch.channels_last).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def step(model, opt, x, y, k: int) -> None:
    for m in model.modules():
        if isinstance(m, KeyedDropout):
            m.at_step(0, k)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dropout_cost.json"))
    args = ap.parse_args()

    settings = ("placement_invariant", "process")
    x = torch.randn(args.batch, 1, args.image_size, args.image_size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    runs = {}
    for rng in settings:
        spec = AlexNetSpec(image_size=args.image_size, width=args.width, dropout_rng=rng)
        runs[rng] = make(spec)
        step(*runs[rng], x, y, 0)  # warm-up
    times = {rng: [] for rng in settings}
    k = 1
    for _ in range(args.rounds):
        for rng in settings:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*runs[rng], x, y, k)
                k += 1
            times[rng].append((time.perf_counter() - t0) / args.steps)

    units = runs["process"][0].fc6.out_features
    draws = []
    for i in range(20):
        t0 = time.perf_counter()
        for layer in (6, 7):
            global_keep_mask(0, i, layer, args.batch, units, 0.5, torch.device("cpu"))
        draws.append(time.perf_counter() - t0)

    step_s = {rng: statistics.median(v) for rng, v in times.items()}
    mask_s = statistics.median(draws)
    result = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "width": args.width,
        "global_batch": args.batch,
        "units": units,
        "step_s_median": step_s,
        "step_ratio_invariant_over_process": step_s["placement_invariant"] / step_s["process"],
        "mask_draw_s_median": mask_s,
        "mask_draw_share_of_step": mask_s / step_s["process"],
        "rounds": times,
    }
    print(
        f"{result['cpu']}, {result['threads']} threads; AlexNet width {args.width} at {args.image_size}, batch {args.batch}"
    )
    print(f"{'setting':<22}{'s/step (median)':>18}")
    for rng in settings:
        print(f"{rng:<22}{step_s[rng]:>18.4f}")
    print(f"ratio placement_invariant / process: {result['step_ratio_invariant_over_process']:.4f}")
    print(
        f"mask draw (2 layers x {args.batch} x {units}): {mask_s * 1e3:.2f} ms = "
        f"{100 * result['mask_draw_share_of_step']:.3f} % of a step"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
