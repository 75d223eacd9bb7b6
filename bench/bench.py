#!/usr/bin/env python
"""Benchmark: distalex against the d2l baseline pipeline, side by side in one invocation.

    python bench/bench.py [--quick] [--out bench/results/bench.json]
    python bench/bench.py --ablation [--quick] [--out bench/results/ablation.json]
    python bench/bench.py --ddp-hooks [--quick]     (adds a ddp row per ddp.comm_hook)

Rows of the benchmark, all on the same
short schedule: the first ``steps x 128`` images of real Fashion-MNIST at 224x224,
one pass (``steps`` optimizer steps of the global batch 128), then the test
accuracy on the first ``test_limit`` test images; plain SGD lr 0.01 as d2l.

  (a) baseline   the d2l baseline pipeline (bench/d2l_baseline.py): PIL Resize + ToTensor
                 in a 4-worker DataLoader, fp32, d2l's train_ch6 loop
  (b) single     distalex, one process, its default fast paths (plus any --set)
  (c) ddp        distalex, 2 processes (gloo), DDP
  (d) mp         distalex, 2 processes, model-parallel: one tower per process
  (e) single-t2  distalex, one process, model.towers=2 (the reference for (d))
  (f) hybrid     distalex, 2 processes, hybrid: data-parallel convolutions, fc6-fc8
                 split by units (Krizhevsky 2014; same network as (b) and (c))
  (g) mp-nchw    (d) with train.channels_last=false: (d)/(g) is what channels_last buys
                 model-parallel now that the tower exchanges keep the layout
  (h) pipeline   distalex, 2 processes, pipeline: 2 stages cut by FLOPs, 4 micro-batches, 1F1B
  (i) fsdp       distalex, 2 processes, fully sharded (FSDP2, one unit per layer)

At equal total cores: a one-process row gets all cores as threads, each of the two
processes of (c)/(d)/(f)/(h)/(i) gets half of them (train.threads; the baseline:
OMP_NUM_THREADS).  Figures per row:

  train      training examples/sec over the training steps only, as d2l counts them
             (distalex: its summary.json; baseline: d2l's Timer), first step included
  steady     the same without the first step (warm-up, compilation)
  e2e        training examples / wall time of the run (data loading, model set-up,
             steps, evaluation, and for distalex the checkpoint it writes)
  process    training examples / wall time of the whole process, interpreter and
             launcher start-up included
  test_acc   after the schedule (at this length, only a smoke check: near chance)
  TFLOP/s    the model's training FLOPs per second at the train rate (distalex/model/flops.py:
             3 x forward, forward = 2 x the MACs of every conv and fc layer)
  MFU        TFLOP/s / (processes x the peak of one process): the matmul peak at the
             row's precision and threads per process, measured once by this script
             (distalex/telemetry/peak.py, cached per machine); on a GPU the datasheet peak

--ddp-hooks adds rows c-bf16, c-fp16 and c-powersgd: ddp with each DDP
communication hook (PowerSGD rank 1 compressing from step 2, so that it acts
within the short schedule); compare them with (c), which all-reduces fp32.

--ablation: distalex single with each fast path toggled against the fast set
(bf16 autocast, channels_last, no compile, foreach SGD, host memory kept), plus everything off;
and an accuracy-parity check (fp32 vs bf16 after a schedule that does learn: the
tiny config for a few epochs, several seeds), since the 224 schedule is too short
for accuracy to mean anything.

Ratios are only meaningful within one invocation (the machine is shared);
``--repeat N`` runs every row N times in alternating order and keeps the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distalex.runtime.io import read_jsonl, write_json

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "launch" / "train.py")
BASELINE = str(ROOT / "bench" / "d2l_baseline.py")
TINY = str(ROOT / "configs" / "tiny.yaml")
BATCH = 128

# The fast set the ablation toggles one switch of at a time.  mixed_precision
# 'no' is quoted: an unquoted `no` is YAML 1.1 for False in an OmegaConf dot-list.
FAST = {
    "train.mixed_precision": "bf16",
    "train.channels_last": "true",
    "train.compile": "false",
    "optim.foreach": "true",
    "train.reuse_host_memory": "true",
}
TOGGLES = [  # (row name, what changes)
    ("fp32", {"train.mixed_precision": "'no'"}),
    ("no-channels_last", {"train.channels_last": "false"}),
    ("compile", {"train.compile": "true"}),
    ("no-foreach", {"optim.foreach": "false"}),
    ("no-reuse_host_memory", {"train.reuse_host_memory": "false"}),
    (
        "all-off",
        {
            "train.mixed_precision": "'no'",
            "train.channels_last": "false",
            "train.compile": "false",
            "optim.foreach": "false",
            "train.reuse_host_memory": "false",
        },
    ),
]


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_name() -> str:
    from distalex.telemetry.peak import cpu_model

    return cpu_model()


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def env_for(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
            "DISTALEX_NO_DOWNLOAD": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def first_error(text: str) -> str:
    """The most telling line of a failed run's output (the exception or distalex's error)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for key in ("distalex: error", "Error:", "Error", "error"):
        hits = [ln for ln in lines if key in ln and "Warning" not in ln]
        if hits:
            return hits[-1][:500]
    return (lines[-1] if lines else "no output")[:500]


def run_proc(cmd, env, log_path: Path, timeout: float):
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.perf_counter() - t0


def overrides_list(d: dict) -> list:
    return [f"{k}={v}" for k, v in d.items()]


# --------------------------------------------------------------------------- rows


def run_baseline(sched: dict, work: Path, timeout: float) -> dict:
    out = work / "baseline.json"
    cmd = [
        sys.executable,
        BASELINE,
        "--image-size",
        str(sched["image_size"]),
        "--train-limit",
        str(sched["train_limit"]),
        "--test-limit",
        str(sched["test_limit"]),
        "--epochs",
        "1",
        "--max-steps",
        str(sched["steps"]),
        "--threads",
        str(cores()),
        "--seed",
        str(sched["seed"]),
        "--json-out",
        str(out),
    ]
    if sched.get("cache_dir"):
        cmd += ["--cache-dir", sched["cache_dir"]]
    rc, proc_s = run_proc(cmd, env_for(cores()), work / "baseline.log", timeout)
    row = {
        "name": "a",
        "label": "d2l baseline pipeline",
        "command": shlex.join(cmd),
        "processes": 1,
        "threads_per_process": cores(),
        "rc": rc,
        "process_s": proc_s,
    }
    if rc != 0 or not out.is_file():
        row["error"] = first_error((work / "baseline.log").read_text(errors="replace"))
        return row
    r = json.loads(out.read_text())
    row.update(
        {
            "train": r["examples_per_sec"],
            "steady": r["steady_examples_per_sec"],
            "e2e": r["e2e_examples_per_sec"],
            "process": r["train_examples"] / proc_s,
            "test_acc": r["test_acc"],
            "loss": r["loss"],
            "steps": r["steps"],
            "train_examples": r["train_examples"],
            "wall_time_s": r["wall_time_s"],
            "mixed_precision": "no",
        }
    )
    return row


def read_distalex(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    batch = summary.get("global_batch", BATCH)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "train_acc" not in r and "examples_per_sec" in r]
    # Log rows carry the epoch's cumulative examples/sec: the training time up to
    # step k is k*B/eps_k, so per-step times follow (one epoch here, log_every=1).
    times = [r["step"] * batch / r["examples_per_sec"] for r in steps if r["examples_per_sec"] > 0]
    steady = summary["examples_per_sec"]
    if len(times) >= 2 and times[-1] > times[0]:
        steady = (len(times) - 1) * batch / (times[-1] - times[0])
    return {
        "summary": summary,
        "steady": steady,
        "step_times_s": [round(b - a, 4) for a, b in zip([0.0] + times[:-1], times, strict=True)],
    }


def run_distalex(
    name: str,
    label: str,
    split_mode: str,
    nprocs: int,
    overrides: list,
    sched: dict,
    work: Path,
    timeout: float,
    config=None,
) -> dict:
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--split-mode", split_mode]
    if config:
        args = ["--config", config] + args
    args += [
        "tracking.wandb=false",
        "tracking.plots=false",
        "train.progress=false",
        f"train.output_dir={run_dir}",
        "train.log_every=1",
        f"train.seed={sched['seed']}",
        f"data.train_limit={sched['train_limit']}",
        f"data.test_limit={sched['test_limit']}",
    ]
    if not config:
        args += [
            f"data.image_size={sched['image_size']}",
            "train.epochs=1",
            f"train.max_steps={sched['steps']}",
            f"train.batch_size={BATCH}",
        ]
    threads = max(1, cores() // nprocs)
    # distalex sets its thread count from train.threads whatever OMP_NUM_THREADS says (launchers
    # overwrite that variable); the environment's stays for the baseline and anything else.
    args += [f"train.threads={threads}", *overrides]
    if nprocs == 1:
        cmd = [sys.executable, TRAIN, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(nprocs),
            "--num_machines",
            "1",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            TRAIN,
            *args,
        ]
    rc, proc_s = run_proc(cmd, env_for(threads), work / f"{name}.log", timeout)
    row = {
        "name": name,
        "label": label,
        "command": f"OMP_NUM_THREADS={threads} " + shlex.join(cmd),
        "processes": nprocs,
        "threads_per_process": threads,
        "rc": rc,
        "process_s": proc_s,
        "overrides": overrides,
    }
    if rc != 0 or not (run_dir / "summary.json").is_file():
        row["error"] = first_error((work / f"{name}.log").read_text(errors="replace"))
        shutil.rmtree(run_dir, ignore_errors=True)
        return row
    r = read_distalex(run_dir)
    s = r["summary"]
    examples = s["steps"] * s.get("global_batch", BATCH)
    row.update(
        {
            "train": s["examples_per_sec"],
            "steady": r["steady"],
            "e2e": examples / s["wall_time_s"],
            "process": examples / proc_s,
            "test_acc": s.get("test_acc"),
            "loss": s.get("loss"),
            "steps": s["steps"],
            "train_examples": examples,
            "wall_time_s": s["wall_time_s"],
            "mixed_precision": s.get("mixed_precision"),
            # The count the run trained with (a --set train.threads=N wins over the row's share).
            "threads_per_process": s.get("threads", threads),
            "towers": s.get("towers"),
            "world_size": s.get("world_size"),
            "flops_per_example": s.get("flops_per_example"),
            "step_times_s": r["step_times_s"],
        }
    )
    for k in (
        "tower_bytes_per_step",
        "hybrid_bytes_per_step",
        "pipeline_bytes_per_step",
        "fsdp_bytes_per_step",
        "ddp_bytes_per_step",
        "param_bytes",
        "grad_bytes",
        "optimizer_bytes",
    ):
        if k in s:
            row[k] = s[k]
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of the full net are ~190 MB
    return row


# --------------------------------------------------------------------------- repeat + table

METRICS = ("train", "steady", "e2e", "process")


def median_rows(runs: list) -> dict:
    """name -> row with the median of each figure over the repeats (first repeat's other fields)."""
    by = {}
    for row in runs:
        by.setdefault(row["name"], []).append(row)
    out = {}
    for name, rows in by.items():
        ok = [r for r in rows if "error" not in r]
        row = dict(ok[0] if ok else rows[0])
        for m in METRICS:
            vals = [r[m] for r in ok if r.get(m) is not None]
            if vals:
                row[m] = statistics.median(vals)
                if len(vals) > 1:
                    row[m + "_all"] = vals
        row["repeats_ok"] = f"{len(ok)}/{len(rows)}"
        out[name] = row
    return out


def ratio(rows: dict, num: str, den: str, metric: str):
    a, b = rows.get(num, {}).get(metric), rows.get(den, {}).get(metric)
    return a / b if a is not None and b else None


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def print_table(title: str, header: list, lines: list) -> str:
    widths = [max(len(str(h)), *(len(str(ln[i])) for ln in lines)) for i, h in enumerate(header)]
    out = [
        title,
        "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(ln, widths, strict=True)) for ln in lines]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def figures_table(rows: dict, order: list) -> str:
    lines = []
    for n in order:
        r = rows[n]
        lines.append(
            [
                n,
                r["label"][:60],
                f"{r['processes']}x{r['threads_per_process']}",
                r.get("mixed_precision") or "-",
                fmt(r.get("train"), 1),
                fmt(r.get("steady"), 1),
                fmt(r.get("e2e"), 1),
                fmt(r.get("process"), 1),
                fmt(r.get("test_acc"), 4),
                fmt(r.get("tflops_per_sec"), 3),
                "-" if r.get("mfu") is None else f"{r['mfu']:.1%}",
                "-" if r.get("mfu_steady") is None else f"{r['mfu_steady']:.1%}",
                r.get("error", "")[:120],
            ]
        )
    return print_table(
        "\nexamples/sec (training steps / steady / end-to-end in-run / whole process), test accuracy,"
        " model TFLOP/s and MFU (at the train and steady rates)",
        [
            "row",
            "what",
            "procs x thr",
            "precision",
            "train",
            "steady",
            "e2e",
            "process",
            "test_acc",
            "TFLOP/s",
            "MFU",
            "MFU steady",
            "error",
        ],
        lines,
    )


# --------------------------------------------------------------------------- modes


def alternating_rounds(items, repeat: int):
    """(round, item) for every item, ``repeat`` rounds, the order reversed every
    other round so that drift in the shared machine's load hits all rows alike."""
    for rep in range(repeat):
        for item in items if rep % 2 == 0 else list(reversed(items)):
            yield rep, item


HOOKS = [  # (row, ddp overrides) for --ddp-hooks
    ("c-bf16", ["ddp.comm_hook=bf16"]),
    ("c-fp16", ["ddp.comm_hook=fp16"]),
    ("c-powersgd", ["ddp.comm_hook=powersgd", "ddp.powersgd_start_iter=2"]),
]


def add_mfu(rows: dict, sched: dict) -> None:
    """TFLOP/s and MFU of every row, all against peaks this process measured (or read
    from the cache), so that every row of one invocation uses the same peaks."""
    from distalex.model.alexnet import AlexNetSpec
    from distalex.model.flops import training_flops
    from distalex.telemetry.peak import device_peak

    peaks = {}
    for row in rows.values():
        if row.get("train") is None:
            continue
        flops = row.get("flops_per_example") or training_flops(AlexNetSpec(image_size=sched["image_size"]))
        precision = row.get("mixed_precision") or "no"
        threads = row["threads_per_process"]
        if (precision, threads) not in peaks:
            peaks[precision, threads] = _peak(device_peak, precision, threads)
        peak = peaks[precision, threads]
        row["tflops_per_sec"] = row["train"] * flops / 1e12
        if peak:
            row["peak_tflops_per_process"] = peak
            row["mfu"] = row["tflops_per_sec"] / (row["processes"] * peak)
            if row.get("steady") is not None:
                row["mfu_steady"] = row["steady"] * flops / 1e12 / (row["processes"] * peak)


def _peak(device_peak, precision: str, threads: int):
    import torch

    if torch.cuda.is_available():
        peak, _ = device_peak(torch.device("cuda", 0), precision)
        return None if peak is None else peak.tflops
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak, line = device_peak(torch.device("cpu"), precision)
    finally:
        torch.set_num_threads(previous)
    print(f"[bench] {line}", flush=True)
    return peak.tflops


def bench(args, sched, work) -> dict:
    extra = list(args.set)
    specs = [
        ("a", None),
        ("b", ("single (distalex)", "single", 1, extra)),
        ("c", ("ddp, 2 processes", "ddp", 2, extra)),
        ("d", ("model-parallel, 2 processes", "model-parallel", 2, extra)),
        ("e", ("single, model.towers=2", "single", 1, ["model.towers=2"] + extra)),
        ("f", ("hybrid, 2 processes", "hybrid", 2, extra)),
        ("g", ("model-parallel, 2 processes, NCHW", "model-parallel", 2, extra + ["train.channels_last=false"])),
        ("h", ("pipeline, 2 stages, 4 micro-batches, 1F1B", "pipeline", 2, extra)),
        ("i", ("fsdp, 2 processes", "fsdp", 2, extra)),
    ]
    if args.ddp_hooks:
        specs += [(name, (f"ddp, 2 processes, {' '.join(ov)}", "ddp", 2, ov + extra)) for name, ov in HOOKS]
    runs = []
    for rep, (name, spec) in alternating_rounds(specs, args.repeat):
        print(f"[bench] round {rep + 1}/{args.repeat}: row {name} ...", flush=True)
        if spec is None:
            row = run_baseline(sched, work, args.timeout)
        else:
            row = run_distalex(name, *spec, sched, work, args.timeout)
        msg = row.get("error") or (
            f"train {row['train']:.1f}, e2e {row['e2e']:.1f} ex/s, test_acc {fmt(row.get('test_acc'), 4)}"
        )
        print(f"[bench]   {name}: {msg}", flush=True)
        runs.append(row)
    rows = median_rows(runs)
    add_mfu(rows, sched)
    order = [s[0] for s in specs]
    text = figures_table(rows, order)
    lines, ratios = [], {}
    for n in order:
        rr = {}
        for m in ("train", "steady", "e2e"):
            for den in ("a", "b", "c", "e"):
                rr[f"{m}/{den}"] = ratio(rows, n, den, m)
        ratios[n] = rr
        lines.append(
            [n, rows[n]["label"]]
            + [fmt(rr[f"{m}/{d}"]) for m in ("train", "e2e") for d in ("a", "b", "e")]
            + [fmt(rr["steady/a"])]
        )
    text += "\n" + print_table(
        "\nratios (row / reference): vs (a) the d2l baseline pipeline, (b) distalex single, (e) single towers=2",
        ["row", "what", "train/a", "train/b", "train/e", "e2e/a", "e2e/b", "e2e/e", "steady/a"],
        lines,
    )
    targets = {
        "single e2e >= 4x baseline": ratios["b"]["e2e/a"],
        "single test_acc within 1 point of baseline": (
            None
            if rows["b"].get("test_acc") is None or rows["a"].get("test_acc") is None
            else rows["b"]["test_acc"] - rows["a"]["test_acc"]
        ),
        "ddp train >= 0.85x single": ratios["c"]["train/b"],
        "model-parallel train >= 0.85x single": ratios["d"]["train/b"],
        "model-parallel train >= 0.9x single towers=2": ratios["d"]["train/e"],
        "hybrid train >= ddp train at equal cores (f / c)": ratio(rows, "f", "c", "train"),
        "hybrid train >= 0.9x single (f / b)": ratios["f"]["train/b"],
        "pipeline train / single (h / b)": ratios["h"]["train/b"],
        "fsdp train / ddp train at equal cores (i / c)": ratio(rows, "i", "c", "train"),
        # channels_last kept across the tower exchanges: what the layout buys model-parallel
        "model-parallel channels_last / NCHW (train)": ratio(rows, "d", "g", "train"),
        "model-parallel channels_last / NCHW (steady)": ratio(rows, "d", "g", "steady"),
        "single MFU >= 0.60 (at the precision the run used)": rows["b"].get("mfu"),
    }
    print("\ntargets (measured):", flush=True)
    for k, v in targets.items():
        print(f"  {k}: {fmt(v, 3)}", flush=True)
    if args.ddp_hooks:
        hook_lines = [
            [n, rows[n]["label"], fmt(rows[n].get("train"), 1), fmt(ratios[n]["train/c"]), fmt(ratios[n]["train/b"])]
            for n in ["c"] + [h for h, _ in HOOKS]
        ]
        text += "\n" + print_table(
            "\nDDP communication hooks: train examples/sec, and relative to (c) (fp32 all-reduce) and (b) single",
            ["row", "what", "train", "÷ (c)", "÷ (b)"],
            hook_lines,
        )
    return {"rows": rows, "ratios": ratios, "targets_measured": targets, "runs": runs, "table": text}


def ablation(args, sched, work) -> dict:
    base = {**FAST, **dict(s.split("=", 1) for s in args.set)}
    variants = [("fast", "fast set: " + " ".join(overrides_list(base)), base)]
    for name, change in TOGGLES:
        variants.append((name, " ".join(overrides_list(change)), {**base, **change}))
    runs = []
    for rep, (name, label, ov) in alternating_rounds(variants, args.repeat):
        print(f"[ablation] round {rep + 1}/{args.repeat}: {name} ...", flush=True)
        row = run_distalex(name, label, "single", 1, overrides_list(ov), sched, work, args.timeout)
        msg = row.get("error") or f"train {row['train']:.1f}, steady {row['steady']:.1f} ex/s"
        print(f"[ablation]   {name}: {msg}", flush=True)
        runs.append(row)
    rows = median_rows(runs)
    add_mfu(rows, sched)
    order = [v[0] for v in variants]
    text = figures_table(rows, order)
    lines, ratios = [], {}
    for n in order:
        ratios[n] = {m: ratio(rows, n, "fast", m) for m in ("train", "steady", "e2e")}
        lines.append(
            [n, rows[n]["label"][:80], fmt(ratios[n]["train"]), fmt(ratios[n]["steady"]), fmt(ratios[n]["e2e"])]
        )
    text += "\n" + print_table(
        "\nablation ratios (variant / fast set; < 1: the toggle slows it down)",
        ["variant", "overrides", "train", "steady", "e2e"],
        lines,
    )
    # Accuracy parity: fp32 vs bf16 after a schedule that learns (tiny config).
    parity_rows, acc = [], {}
    p = sched["parity"]
    for seed in range(p["seeds"]):
        for name, prec in (("fp32", "'no'"), ("bf16", "bf16")):
            psched = {"seed": seed, "train_limit": p["train_limit"], "test_limit": p["test_limit"]}
            ov = [
                f"train.mixed_precision={prec}",
                f"train.channels_last={base['train.channels_last']}",
                f"train.epochs={p['epochs']}",
            ]
            print(f"[parity] seed {seed} {name} ...", flush=True)
            row = run_distalex(
                f"parity-{name}-s{seed}",
                f"tiny {name} seed {seed}",
                "single",
                1,
                ov,
                psched,
                work,
                args.timeout,
                config=TINY,
            )
            print(f"[parity]   {row.get('error') or 'test_acc {:.4f}'.format(row['test_acc'])}", flush=True)
            parity_rows.append(row)
            if "error" not in row:
                acc.setdefault(name, []).append(row["test_acc"])
    mean = {k: statistics.mean(v) for k, v in acc.items()}
    lines = [[k, " ".join(fmt(a, 4) for a in acc[k]), fmt(mean[k], 4)] for k in acc]
    text += "\n" + print_table(
        f"\naccuracy parity: tiny config ({p['train_limit']} images, {p['epochs']} epochs, "
        f"seeds 0..{p['seeds'] - 1}), test accuracy",
        ["precision", "per seed", "mean"],
        lines,
    )
    diff = mean["bf16"] - mean["fp32"] if "bf16" in mean and "fp32" in mean else None
    print(f"  bf16 - fp32 mean test accuracy: {fmt(diff, 4)}", flush=True)
    return {
        "rows": rows,
        "ratios": ratios,
        "runs": runs,
        "parity": {"runs": parity_rows, "test_acc": acc, "mean": mean, "bf16_minus_fp32": diff},
        "table": text,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--quick", action="store_true", help="shortest schedule (a smoke run, ~2 min)")
    ap.add_argument("--ablation", action="store_true", help="fast-path ablation instead of the benchmark")
    ap.add_argument("--ddp-hooks", action="store_true", help="add a ddp row for each ddp.comm_hook")
    ap.add_argument("--steps", type=int, default=None, help="training steps per row (default 8; --quick 3)")
    ap.add_argument("--test-limit", type=int, default=None, help="test images (default 512; --quick 256)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="run every row N times (alternating order), keep medians")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra distalex override for every distalex row (bench: on top of the config's "
        "defaults; ablation: replaces that key of the fast set)",
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--cache-dir", default=None, help="where the baseline unpacks Fashion-MNIST for torchvision")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/{bench,ablation}.json)")
    args = ap.parse_args(argv)

    steps = args.steps or (3 if args.quick else 8)
    sched = {
        "image_size": args.image_size,
        "steps": steps,
        "train_limit": steps * BATCH,
        "test_limit": args.test_limit or (256 if args.quick else 512),
        "seed": args.seed,
        "batch": BATCH,
        "lr": 0.01,
        "cache_dir": args.cache_dir,
        "parity": (
            {"train_limit": 6016, "test_limit": 1000, "epochs": 3, "seeds": 1}
            if args.quick
            else {"train_limit": 12000, "test_limit": 2000, "epochs": 5, "seeds": 2}
        ),
    }
    work = Path(tempfile.mkdtemp(prefix="distalex-bench-"))
    if not args.cache_dir:
        sched["cache_dir"] = str(work / "fmnist-cache")
    meta = {
        "mode": "ablation" if args.ablation else "bench",
        "command": shlex.join([sys.executable] + sys.argv),
        "schedule": {k: v for k, v in sched.items() if k != "cache_dir"},
        "cores": cores(),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover
        pass
    print(
        f"[bench] {meta['mode']}: {steps} steps x {BATCH} images at {args.image_size}px, test {sched['test_limit']} "
        f"images, {cores()} cores ({meta['cpu']}), work dir {work}",
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        result = ablation(args, sched, work) if args.ablation else bench(args, sched, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta.update({"loadavg_end": loadavg(), "total_s": time.perf_counter() - t0})
    out = Path(args.out or ROOT / "bench" / "results" / ("ablation.json" if args.ablation else "bench.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {**meta, **result})
    print(
        f"\n[bench] {time.perf_counter() - t0:.0f} s in all; load average {meta['loadavg_start']} -> "
        f"{meta['loadavg_end']}; JSON: {out}",
        flush=True,
    )
    failed = [r["name"] for r in result["runs"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
