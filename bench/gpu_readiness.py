#!/usr/bin/env python
"""GPU readiness checks, on one card, in one call (run by bench/gpu_check.sh first).

    python bench/gpu_readiness.py [--out DIR] [--only NAME ...]
    python bench/gpu_readiness.py --dry-run-cpu     # the script's own logic, on the CPU, tiny sizes

Each check prints PASS, FAIL or SKIP with its figures; all of them go to
DIR/gpu_readiness.json.  Exit status 0 when no check failed.  What each one does
(the CPU tests prove the same logic with gloo processes; these show it on the card):

  precision        mixed_precision=auto on this card: the compute capability, torch's
                   bf16 checks with and without emulation, distalex's decision (bf16 from
                   capability 8.0, else fp32), and that a real run records it.
  gpu_count        more processes than visible GPUs: `accelerate launch` with
                   device_count + 1 processes must be refused, exit 2 on every rank,
                   with the one-line message, before NCCL sees two ranks on one GPU.
  towers_on_gpu    two tower processes sharing this card over gloo (CUDA tensors; NCCL
                   cannot put two ranks on one GPU): (a) channels_last survives the tower
                   exchange and forward/gradients equal the reference model's on the card;
                   (b) fp16 with a CUDA GradScaler, an overflow injected on one tower only:
                   both towers skip the step and keep one scale, the next step equals the
                   reference's.
  fp16_run         the CLI with train.mixed_precision=fp16 (accelerate's CUDA scaler through
                   distalex.runtime.precision.optimizer_step) trains and records fp16.
  deterministic    train.deterministic=true with LRN: a run resumed from a middle
                   checkpoint ends bitwise equal to the uninterrupted run; the same pair
                   without it is reported (information, not a pass/fail).
  layout_cost      what keeping channels_last across an exchange saves on this card: the
                   reference network (2 towers, full width, 224 px, bf16) with channels_last
                   throughout vs the same with conv3's input forced to NCHW (what the
                   exchange used to hand on).  Timing only; the 2-GPU effect needs 2 GPUs.

Needs torch, accelerate, omegaconf and Fashion-MNIST (DISTALEX_DATA or the Debian path);
installs nothing.  About 2-3 minutes on an H100 (most of it process start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"  # --dry-run-cpu: "cpu"
TRAIN = str(ROOT / "launch" / "train.py")
TINY = str(ROOT / "configs" / "tiny.yaml")
sys.path.insert(0, str(ROOT))

QUICK = [
    "--config", TINY, "tracking.wandb=false", "tracking.plots=false", "train.progress=false",
    "data.train_limit=320", "data.test_limit=64", "train.batch_size=32",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_gpu(**extra) -> dict:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def cli(*args, nprocs: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    if nprocs == 1:
        cmd = [sys.executable, TRAIN, *args]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nprocs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), TRAIN, *args,
        ]  # fmt: skip
    env = env_gpu(CUDA_VISIBLE_DEVICES="") if DEVICE == "cpu" else env_gpu()
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# --------------------------------------------------------------------------- checks


def check_precision(work: Path) -> dict:
    from distalex.runtime.precision import cpu_native_bf16, resolve_precision

    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    if DEVICE == "cpu":
        dev = torch.device("cpu")
        out = {"device": "cpu", "expected": "bf16" if cpu_native_bf16() else "no"}
    else:
        dev = torch.device("cuda", 0)
        major, minor = torch.cuda.get_device_capability(dev)
        out = {
            "device": torch.cuda.get_device_name(dev),
            "capability": f"{major}.{minor}",
            "is_bf16_supported(emulation counted)": torch.cuda.is_bf16_supported(),
            "is_bf16_supported(including_emulation=False)": torch.cuda.is_bf16_supported(including_emulation=False),
            "expected": "bf16" if major >= 8 else "no",
        }
    decided = out["auto"] = resolve_precision("auto", dev)
    expected = out["expected"]
    run = work / "precision-run"
    proc = cli(*QUICK, "train.max_steps=2", f"train.output_dir={run}")
    out["run_rc"] = proc.returncode
    out["run_records"] = summary(run).get("mixed_precision") if proc.returncode == 0 else proc.stderr[-500:]
    out["status"] = "PASS" if decided == expected == out["run_records"] else "FAIL"
    return out


def check_gpu_count(work: Path) -> dict:
    if DEVICE == "cpu":
        return {"status": "SKIP", "why": "CPU processes need no GPU"}
    n = torch.cuda.device_count() + 1
    run = work / "gpu-count"
    proc = cli(*QUICK, "--split-mode", "ddp", "train.max_steps=2", f"train.output_dir={run}", nprocs=n)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
    expected = f"{n} processes on this node but {n - 1} visible GPU(s)"
    ok = proc.returncode != 0 and "exitcode: 2" in proc.stderr and len(errors) == 1 and expected in errors[0]
    ok = ok and not (run / "metrics.jsonl").exists() and "NCCL" not in "".join(errors)
    return {
        "processes": n,
        "rc": proc.returncode,
        "errors": errors,
        "status": "PASS" if ok else "FAIL",
        "stderr_tail": "" if ok else proc.stderr[-1500:],
    }


def _tower_worker(rank: int, world: int, store: str, out_dir: str, device_type: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from distalex.model.alexnet import AlexNet, AlexNetSpec, init_weights
    from distalex.parallel.mesh import Mesh, process_groups
    from distalex.parallel.placement import placement_for
    from distalex.runtime.precision import optimizer_step

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    timeout = timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout)
    spec = AlexNetSpec(towers=2, width=0.25, image_size=67, dropout=0.0, lrn=True)
    mesh = Mesh(world, 1, 2)  # one card shared on purpose (gloo): the placement planner would refuse it
    placement = placement_for("model-parallel", mesh, rank, dev, spec)
    placement.tower_group, placement.replica_group = process_groups(mesh, timeout)
    res = {}

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 67, 67, generator=g).to(dev)
    y = torch.randint(0, 10, (8,), generator=g).to(dev)

    # (a) channels_last across the exchange, exactness on the card (fp32, no TF32)
    tower = placement.build_model("xavier", seed=0).to(memory_format=torch.channels_last)
    layouts = {}
    tower.conv3.register_forward_pre_hook(
        lambda m, a: layouts.__setitem__("conv3_input", a[0].is_contiguous(memory_format=torch.channels_last))
    )

    def watch(module, args, out):
        out.register_hook(
            lambda gr: layouts.__setitem__("pool2_grad", gr.is_contiguous(memory_format=torch.channels_last))
        )

    tower.pool2.register_forward_hook(watch)
    logits = tower(x.contiguous(memory_format=torch.channels_last))
    F.cross_entropy(logits, y).backward()
    grads = placement.full_tensors({n: p.grad for n, p in tower.named_parameters()})
    torch.manual_seed(0)
    ref = AlexNet(spec)
    init_weights(ref, "xavier")
    ref = ref.to(dev)
    ref_logits = ref(x)
    F.cross_entropy(ref_logits, y).backward()

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    res["layouts"] = layouts
    res["logits_rel_err"] = rel(logits.detach(), ref_logits.detach())
    res["grad_rel_err_max"] = max(rel(grads[n], p.grad) for n, p in ref.named_parameters())

    # (b) fp16 + CUDA GradScaler, overflow on tower 1 only
    tower = placement.build_model("xavier", seed=0)
    initial = {k: v.clone() for k, v in tower.state_dict().items()}
    opt = torch.optim.SGD(tower.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device_type, init_scale=1024.0, growth_interval=1000)
    scales = [scaler.get_scale()]
    for step in range(2):
        with torch.autocast(device_type, dtype=torch.float16 if device_type == "cuda" else torch.bfloat16):
            loss = F.cross_entropy(tower(x), y)
        scaler.scale(loss).backward()
        if step == 0 and rank == 1:
            next(iter(tower.parameters())).grad.view(-1)[0] = float("inf")
        optimizer_step(opt, scaler)
        opt.zero_grad()
        scales.append(scaler.get_scale())
        if step == 0:
            res["skipped_everywhere_here"] = all(torch.equal(v, initial[k]) for k, v in tower.state_dict().items())
    res["scales"] = scales
    res["stepped_after"] = not all(torch.equal(v, initial[k]) for k, v in tower.state_dict().items())
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def check_towers_on_gpu(work: Path) -> dict:
    import torch.multiprocessing as mp

    d = work / "towers"
    d.mkdir()
    mp.spawn(_tower_worker, args=(2, str(d / "store"), str(d), DEVICE), nprocs=2, join=True)
    ranks = [torch.load(d / f"rank{r}.pt") for r in range(2)]
    layout_ok = all(r["layouts"] == {"conv3_input": True, "pool2_grad": True} for r in ranks)
    exact = all(r["logits_rel_err"] <= 1e-4 and r["grad_rel_err_max"] <= 1e-4 for r in ranks)
    agreed = all(r["skipped_everywhere_here"] and r["scales"] == [1024.0, 512.0, 512.0] for r in ranks)
    stepped = all(r["stepped_after"] for r in ranks)
    return {
        "ranks": ranks,
        "channels_last_kept": layout_ok,
        "exact_vs_reference_1e-4": exact,
        "fp16_overflow_skipped_on_both_one_scale": agreed,
        "clean_step_after": stepped,
        "status": "PASS" if layout_ok and exact and agreed and stepped else "FAIL",
    }


def check_fp16_run(work: Path) -> dict:
    if DEVICE == "cpu":
        return {"status": "SKIP", "why": "fp16 needs CUDA (refused on the CPU)"}
    run = work / "fp16"
    proc = cli(
        *QUICK, "train.max_steps=6", "train.log_every=1", "train.mixed_precision=fp16", f"train.output_dir={run}"
    )
    if proc.returncode != 0:
        return {"status": "FAIL", "rc": proc.returncode, "stderr_tail": proc.stderr[-1500:]}
    s = summary(run)
    ok = s["mixed_precision"] == "fp16" and s["steps"] == 6
    return {"status": "PASS" if ok else "FAIL", "mixed_precision": s["mixed_precision"], "loss": s.get("loss")}


def _resume_pair(work: Path, name: str, deterministic: bool) -> dict:
    from distalex.training.checkpoint import list_checkpoints, read

    args = [
        *QUICK, "train.max_steps=14", "train.log_every=1", "train.checkpoint_every=3", "train.keep_checkpoints=100",
        "model.lrn=true", f"train.deterministic={str(deterministic).lower()}",
    ]  # fmt: skip
    straight, resumed = work / f"{name}-straight", work / f"{name}-resumed"
    proc = cli(*args, f"train.output_dir={straight}")
    if proc.returncode != 0:
        return {"rc": proc.returncode, "stderr_tail": proc.stderr[-1500:]}
    shutil.copytree(straight, resumed)
    for path in list_checkpoints(str(resumed)):
        if read(path)["position"]["step"] > 6:
            path.unlink()
    (resumed / "summary.json").unlink()
    proc = cli(*args, "train.resume=auto", f"train.output_dir={resumed}")
    if proc.returncode != 0:
        return {"rc": proc.returncode, "stderr_tail": proc.stderr[-1500:]}
    a = read(list_checkpoints(str(straight))[-1])["model"]
    b = read(list_checkpoints(str(resumed))[-1])["model"]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    max_abs = max((a[k] - b[k]).abs().max().item() for k in a)
    s = summary(straight)
    return {
        "bitwise_equal": not differ,
        "tensors_differing": len(differ),
        "max_abs_diff": max_abs,
        "recorded": {k: s.get(k) for k in ("deterministic", "cudnn_benchmark", "mixed_precision", "device")},
    }


def check_deterministic(work: Path) -> dict:
    det = _resume_pair(work, "det", True)
    info = _resume_pair(work, "nondet", False)
    ok = det.get("bitwise_equal") is True and det["recorded"]["deterministic"] is True
    return {"status": "PASS" if ok else "FAIL", "deterministic": det, "without_deterministic_info": info}


def check_layout_cost(work: Path, iters: int = 20) -> dict:
    import torch.nn.functional as F

    from distalex.model.alexnet import AlexNet, AlexNetSpec

    cpu = DEVICE == "cpu"
    dev = torch.device("cpu") if cpu else torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = not cpu
    width, size, batch, iters = (0.125, 67, 8, 2) if cpu else (1.0, 224, 128, iters)
    spec = AlexNetSpec(towers=2, width=width, image_size=size, in_channels=3, num_classes=1000, dropout=0.0, lrn=True)
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)
    times = {}
    for variant in ("channels_last_kept", "nchw_after_exchange"):
        net = AlexNet(spec).to(dev).to(memory_format=torch.channels_last)
        if variant == "nchw_after_exchange":
            # what the exchange used to hand on: a contiguous NCHW tensor into conv3
            net.conv3.register_forward_pre_hook(lambda m, a: (a[0].contiguous(),))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)

        def step(net=net, opt=opt):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        sync = (lambda: None) if cpu else torch.cuda.synchronize
        for _ in range(1 if cpu else 5):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        times[variant] = (time.perf_counter() - t0) / iters
    return {
        "status": "PASS",
        "ms_per_step": {k: round(v * 1e3, 3) for k, v in times.items()},
        "nchw_over_kept": times["nchw_after_exchange"] / times["channels_last_kept"],
        "note": "one card, one process: the conversion the old exchange forced before conv3, not a 2-GPU run",
    }


CHECKS = {
    "precision": check_precision,
    "gpu_count": check_gpu_count,
    "towers_on_gpu": check_towers_on_gpu,
    "fp16_run": check_fp16_run,
    "deterministic": check_deterministic,
    "layout_cost": check_layout_cost,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    ap.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    ap.add_argument("--dry-run-cpu", action="store_true", help="run the checks' logic on the CPU (tiny sizes)")
    args = ap.parse_args(argv)
    global DEVICE
    if args.dry_run_cpu:
        DEVICE = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        print("gpu_readiness: no CUDA device; these checks need one (--dry-run-cpu for a dry run)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu_readiness-") as tmp:
        for name in args.only:
            t0 = time.perf_counter()
            work = Path(tmp) / name
            work.mkdir()
            try:
                res = CHECKS[name](work)
            except Exception as exc:
                res = {
                    "status": "FAIL",
                    "error": f"{type(exc).__name__}: {exc}",
                    "trace": traceback.format_exc()[-2000:],
                }
            res["seconds"] = round(time.perf_counter() - t0, 1)
            results[name] = res
            brief = {k: v for k, v in res.items() if k not in ("trace", "ranks", "stderr_tail")}
            print(f"gpu_readiness: {res['status']} {name}: {json.dumps(brief, default=str)}", flush=True)
            if res["status"] == "FAIL" and ("trace" in res or "stderr_tail" in res):
                print(res.get("trace") or res.get("stderr_tail"), flush=True)
            # after every check: a timeout of the whole script still leaves what was done
            (out / "gpu_readiness.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    failed = [n for n, r in results.items() if r["status"] == "FAIL"]
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("PASS", "SKIP", "FAIL")}
    print(
        f"gpu_readiness: {counts['PASS']} passed, {counts['SKIP']} skipped, {counts['FAIL']} failed"
        + (f": {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
