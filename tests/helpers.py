"""Helpers every test shares: run the real CLI (one process, or N gloo ranks
through ``accelerate launch``), read a run's records, make image folders,
check PNGs, and the one table of split modes the placement tests use."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from distalex.runtime.io import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "launch" / "train.py")
EVALUATE = str(ROOT / "launch" / "evaluate.py")
PREDICT = str(ROOT / "launch" / "predict.py")
EXPORT = str(ROOT / "launch" / "export.py")
TINY = str(ROOT / "configs" / "tiny.yaml")
PAPER = str(ROOT / "configs" / "paper_imagenet.yaml")
# One CPU thread per training process: the suite runs one test file per core (xdist), and
# distalex sets train.threads whatever OMP_NUM_THREADS says (auto would take every core).
ONE_THREAD = "train.threads=1"
# A few seconds per run on 2 cores: 1/8-width network, 67x67 images, small subsets.
QUICK = [
    "--config", TINY, "tracking.wandb=false", "train.progress=false",
    "data.train_limit=1024", "data.test_limit=256", "train.batch_size=32", ONE_THREAD,
]  # fmt: skip

# The placement comparisons' runs (test_placements, test_comm_hooks): fp32 (the invariance is
# proven "up to float rounding" at fp32's rounding), dropout on, 8 steps of 5 per epoch
# (the steps cross an epoch boundary).  Runs of these arguments are shared (shared_run).
EXACT_STEPS = 8
EXACT = QUICK + [
    "model.dropout=0.5", f"train.max_steps={EXACT_STEPS}", "train.log_every=1", "train.mixed_precision=no",
    "data.train_limit=160",
]  # fmt: skip

# Every split mode with the process count the placement tests run it at.
SPLIT_MODES = {
    "single": (1, ["--split-mode", "single"]),
    "ddp": (2, ["--split-mode", "ddp"]),
    "model-parallel": (2, ["--split-mode", "model-parallel"]),
    "hybrid": (2, ["--split-mode", "hybrid"]),
    "pipeline": (2, ["--split-mode", "pipeline"]),
    "fsdp": (2, ["--split-mode", "fsdp"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    """The environment of a CLI subprocess: wandb off, one thread (torch's, in training runs,
    is train.threads: ONE_THREAD), pinned to the CPU
    (so the multi-process tests run unchanged on a machine with one GPU)."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra)
    return env


def launch_cmd(nprocs: int, *args, extra_launch=(), script=TRAIN) -> list:
    """The command users type: plain python for 1 process, accelerate launch for more.
    Training runs start with ONE_THREAD (a train.threads of the test's own comes later and wins)."""
    if script == TRAIN:
        args = (ONE_THREAD, *args)
    if nprocs == 1:
        return [sys.executable, script, *args]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nprocs),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *extra_launch, script, *args,
    ]  # fmt: skip


def run_cli(
    *args, nprocs: int = 1, timeout: float = 300, env=None, check=True, script=TRAIN
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        launch_cmd(nprocs, *args, script=script),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def shared_run(tmp_path_factory, *args, nprocs: int = 1) -> Path:
    """The output dir of one CLI run of ``args`` on ``nprocs`` processes, computed once per test
    session and shared by every test file and xdist worker that asks for the same run (a
    reference run several comparisons need).  A file lock makes the others wait for the first."""
    import fcntl
    import hashlib

    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker has its own basetemp inside the session's: share the session's.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-runs"
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([nprocs, *args]).encode()).hexdigest()[:16]
    out, done = root / key, root / f"{key}.done"
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            run_cli(*args, f"train.output_dir={out}", nprocs=nprocs)
            done.write_text("")
    return out


def start_cli(nprocs: int, *args, cmd=None) -> subprocess.Popen:
    """The CLI (or ``cmd``) in the background, in a session of its own."""
    return subprocess.Popen(
        cmd or launch_cmd(nprocs, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        start_new_session=True,
    )


SIGNALLER = """
import os, sys
step, signum, rank = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sys.argv = [sys.argv[0]] + sys.argv[4:]
from distalex.training import trainer

real = trainer.Trainer.train_step

def train_step(self, x, y):
    real(self, x, y)
    # After the optimizer step of `step`: the signal reaches the process exactly as a
    # scheduler's does, but at a known instant, so it can never lose a race with the run's end.
    if os.environ.get("RANK", "0") == rank and self.state.position.step + 1 == step:
        os.kill(os.getpid(), signum)

trainer.Trainer.train_step = train_step
from distalex.cli import main
sys.exit(main())
"""


def signal_at_step_cmd(tmp_path, nprocs: int, step: int, signum: int, *args, rank: int = 0) -> list:
    """The command users type, delivering ``signum`` to rank ``rank`` right after step ``step``."""
    script = Path(tmp_path) / f"signaller_{os.getpid()}_{step}_{signum}.py"
    script.write_text(SIGNALLER)
    cmd = launch_cmd(nprocs, *args)
    i = cmd.index(TRAIN)
    return cmd[:i] + [str(script), str(step), str(int(signum)), str(rank)] + cmd[i + 1 :]


KILL_AT_WRITE = str(ROOT / "tests" / "kill_at_write.py")


def kill_at_write_cmd(nprocs: int, instant: str, *args) -> list:
    """The command users type, with the main process SIGKILLed right after the write
    ``instant`` names (tests/kill_at_write.py lists them: ``row@8``, ``curves@8``, ...)."""
    cmd = launch_cmd(nprocs, *args)
    i = cmd.index(TRAIN)
    return cmd[:i] + [KILL_AT_WRITE, instant] + cmd[i + 1 :]


def wait_for_step(proc, run_dir, step, timeout=240):
    """Until metrics.jsonl has a row of ``step`` or later; fails if the run ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = Path(run_dir) / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"run did not reach step {step}")


def worker_pids(run_dir, local_rank=None) -> list:
    """Pids of the CLI processes training into ``run_dir`` (of one local rank, or all)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir) not in cmdline or "launch/train.py" not in cmdline or int(entry.name) == os.getpid():
            continue
        if local_rank is None or f"LOCAL_RANK={local_rank}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def kill_job(proc, run_dir, sig):
    """Signal the launcher and every worker at once (torch's launcher puts its
    workers in sessions of their own, so the launcher's process group is not enough)."""
    for pid in [proc.pid] + worker_pids(run_dir):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def assert_bad_input(proc, *needles):
    """Exit 2 with one ``distalex: error:`` line holding every needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def assert_same_losses(a, b, steps: int = EXACT_STEPS) -> None:
    """Two runs logged steps 1..steps with losses equal to 1e-4 relative, step for step."""
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-4 * abs(la[step]), (step, la[step], lb[step])


def metrics(run_dir) -> list:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


# Row fields that are measured (or derived from a measurement): the only ones a resumed run's
# rows may differ in from the uninterrupted run's.
TIMING = ("examples_per_sec", "tflops_per_sec", "mfu", "epoch_time_s")


def rows_without_timing(run_dir) -> list:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run_dir)]


def step_losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "train_acc" not in r and "loss" in r}


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def latest_checkpoint(run_dir) -> Path:
    return sorted((Path(run_dir) / "checkpoints").glob("step_*"))[-1]


def make_folder(root, classes=3, n_train=6, n_val=3, seed=0):
    """An ImageFolder (``train/`` and ``val/``): a solid colour per class plus pixel
    noise (learnable), landscape and portrait (40x48, 48x40), JPEG and PNG mixed
    (``img0`` is a JPEG).  ``classes``: a count (folders ``class0`` ...) or names."""
    names = [f"class{c}" for c in range(classes)] if isinstance(classes, int) else list(classes)
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, size=(len(names), 3))
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(names):
            d = Path(root) / split / name
            d.mkdir(parents=True)
            for i in range(n):
                shape = (40, 48, 3) if i % 2 == 0 else (48, 40, 3)
                pixels = np.clip(colours[c] + rng.normal(0, 20, size=shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / (f"img{i}.png" if i % 2 else f"img{i}.jpg"))
    return Path(root)


def png_size(path) -> tuple:
    """(bytes, width, height) of a valid PNG file; fails the test on anything else."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    with Image.open(path) as im:
        im.verify()
    return len(data), width, height


def device_loader(dataset, global_batch, image_size, seed, device, replica=0, replicas=1, channels_last=False):
    """A DeviceLoader over ``dataset`` for replica ``replica`` of ``replicas``."""
    from distalex.data import DeviceLoader, GlobalBatchPlan

    plan = GlobalBatchPlan(len(dataset), global_batch, replica, replicas, seed)
    return DeviceLoader(dataset, plan, image_size, device, channels_last=channels_last)


# --------------------------------------------------------------------------- absolute references
# The d2l chapter's training loop and accuracy, written from scratch with plain PyTorch.  They share
# nothing with distalex's loop, meters or evaluation, so a bug that every placement shares (and that
# comparisons between placements therefore cannot see) shows up as a difference from these.


def reference_sgd(model, optim_cfg):
    """``torch.optim.SGD`` built from the config's optim section, as the chapter builds it."""
    import torch

    o = optim_cfg
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def reference_step(model, optimizer, x, y):
    """One step of the chapter's loop: forward, cross-entropy, backward, SGD step.  Returns (loss, logits)."""
    import torch.nn.functional as F

    model.train()
    optimizer.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss.item(), logits.detach()


def reference_counts(model, batches, k=5) -> tuple:
    """(top-1 hits, top-k hits, examples) of ``model`` in eval mode over (images, labels) batches."""
    import torch

    model.eval()
    top1 = topk = n = 0
    with torch.no_grad():
        for x, y in batches:
            best = model(x).topk(k, dim=1).indices
            top1 += int((best[:, 0] == y).sum())
            topk += int((best == y[:, None]).any(1).sum())
            n += len(y)
    return top1, topk, n


def rel_err(a, b) -> float:
    """|a - b| / |b| (Frobenius norms)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inner_optimizer(trainer):
    """The torch optimizer inside accelerate's wrapper (to register torch's step hooks on it)."""
    return getattr(trainer.state.optimizer, "optimizer", trainer.state.optimizer)


def nan_loss_at(trainer, step: int, poison: bool = True) -> None:
    """Make training step ``step``'s logits NaN (if ``poison``; a rank passes False to keep its own
    finite) and skip that step's update everywhere, as a gradient scaler would: the loss is not
    finite, the weights stay finite, so only the loss guard can catch it."""
    forwards = {"n": 0}

    def poison_logits(module, inputs, output):
        if module.training:
            forwards["n"] += 1
            if forwards["n"] == step and poison:
                return output + float("nan")
        return None

    def skip_update(opt, args, kwargs):
        if forwards["n"] == step:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None

    trainer.state.model.register_forward_hook(poison_logits)
    inner_optimizer(trainer).register_step_pre_hook(skip_update)


# --------------------------------------------------------------------------- exports
def assert_close(got, expected, tolerance=1e-5):
    """Each output within ``tolerance`` x the largest |logit| of the reference's (what export checks)."""
    import torch

    for g, e in zip(got, expected, strict=True):
        assert tuple(g.shape) == tuple(e.shape)
        assert (torch.as_tensor(g) - e).abs().max().item() <= tolerance * e.abs().max().item()


def docs_loader() -> str:
    """The plain-PyTorch block of docs/use.md."""
    text = (ROOT / "docs" / "use.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "plain PyTorch: load a distalex state-dict export" in b)


def assert_plain_pytorch_loads(path, batches, expected, tmp_path) -> None:
    """docs/use.md's loader, run where distalex cannot be imported, gives the reference outputs."""
    from safetensors.torch import save_file

    save_file({f"x{i}": x for i, x in enumerate(batches)}, str(tmp_path / "inputs.safetensors"))
    script = tmp_path / "plain.py"
    script.write_text(
        "import sys\nsys.modules['distalex'] = None  # any import of distalex fails\n"
        + docs_loader()
        + "\nimport torch\nfrom safetensors.torch import load_file, save_file\n"
        "model, classes = load_alexnet(sys.argv[1])\n"
        "xs = load_file(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    save_file({k: model(x) for k, x in xs.items()}, sys.argv[3])\n"
        "print(len(classes))\n"
    )
    outputs = tmp_path / "outputs.safetensors"
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "inputs.safetensors"), str(outputs)],
        capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    got = load_file(str(outputs))
    assert_close([got[f"x{i}"] for i in range(len(batches))], expected)
    assert proc.stdout.strip() == str(expected[0].shape[1])
