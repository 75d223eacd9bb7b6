"""A run's lifecycle through the real CLI: safe checkpoint loading, one run per
output dir, exact resume of a finished run,
unusable output dirs, a full disk, torn records, changed settings on resume,
and self-healing restarts under the launcher.

Kills are injected by a wrapper script (``KILLER``) that patches one function of
distalex in the test's own process and then runs the CLI: product code has no
test hooks."""

import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from distalex.training.checkpoint import list_checkpoints, read

from helpers import (
    QUICK,
    ROOT,
    TRAIN,
    assert_bad_input,
    cli_env,
    latest_checkpoint,
    launch_cmd,
    metrics,
    rows_without_timing,
    run_cli,
    start_cli,
    summary,
    wait_for_step,
)

STEPS = 14
# 10 steps per epoch: epoch 0 ends at step 10; at step 14 a step checkpoint is written, then
# the final evaluation and its checkpoint.  Dropout on: the RNG streams must resume too.
END = QUICK + [f"train.max_steps={STEPS}", "train.log_every=1", "train.checkpoint_every=7", "data.train_limit=320"]

KILLER = textwrap.dedent("""
    import os, signal, sys
    boundary, step, rank = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.argv = [sys.argv[0]] + sys.argv[4:]
    from distalex.training import checkpoint
    from distalex.training import trainer
    from distalex.telemetry.records import RunLog

    def armed():  # this rank, first attempt only (a launcher's restart runs unharmed)
        return os.environ.get("RANK", "0") == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(owner, name, when):
        real = getattr(owner, name)
        def patched(*args, **kwargs):
            out = real(*args, **kwargs)
            if armed() and when(*args, **kwargs):
                die()
            return out
        setattr(owner, name, patched)

    def before(owner, name, when):
        real = getattr(owner, name)
        def patched(*args, **kwargs):
            if armed() and when(*args, **kwargs):
                die()
            return real(*args, **kwargs)
        setattr(owner, name, patched)

    if boundary == "after_step":  # the optimizer step of `step` is done, nothing else
        after(trainer.Trainer, "train_step", lambda self, x, y: self.state.position.step + 1 == step)
    elif boundary == "after_step_checkpoint":  # the step's checkpoint, not its evaluation's
        after(checkpoint, "save", lambda placement, state, *a, **k: state.position.step == step)
    elif boundary == "after_summary":
        after(RunLog, "finish", lambda self, summary: True)
    elif boundary == "before_first_checkpoint":
        before(checkpoint, "save", lambda *a, **k: True)
    else:
        raise SystemExit("unknown boundary " + boundary)
    from distalex.cli import main
    sys.exit(main())
""")


def killer_cmd(tmp_path, nprocs, boundary, step, *args, rank=0, extra_launch=()):
    """The command users type, with the training script replaced by KILLER."""
    script = tmp_path / f"killer_{uuid.uuid4().hex[:8]}.py"
    script.write_text(KILLER)
    cmd = launch_cmd(nprocs, *args, extra_launch=extra_launch)
    i = cmd.index(TRAIN)
    return cmd[:i] + [str(script), boundary, str(step), str(rank)] + cmd[i + 1 :]


def run_killed(tmp_path, boundary, step, *args, nprocs=1):
    cmd = killer_cmd(tmp_path, nprocs, boundary, step, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env(), cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    return proc


def weights(run_dir):
    state = read(latest_checkpoint(run_dir))
    return state["position"]["step"], state["model"]


def assert_same_run(a, b):
    """b ends as a: weights bitwise, every metrics row, and the summary's figures."""
    (step_a, wa), (step_b, wb) = weights(a), weights(b)
    assert step_a == step_b == STEPS
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    assert rows_without_timing(b) == rows_without_timing(a)
    sa, sb = summary(a), summary(b)
    for key in ("loss", "train_acc", "test_acc", "test_top5", "train_examples", "steps", "epochs"):
        assert sb[key] == sa[key], (key, sa.get(key), sb.get(key))
    # the throughput is computed from the same examples as the uninterrupted run's
    assert sb["examples_per_sec"] == sb["train_examples"] / sb["train_time_s"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run_cli(*END, f"train.output_dir={out}")
    return out


# -- exact resume at the end of a run -------------------------------------------------------
# The kills between the writes of a run's last step (after its row, its step checkpoint, its
# evaluation row, the curves, the evaluation's checkpoint, during the summary's write) are
# tested in every placement by test_reliability.py::test_kill_at_every_instant_of_a_step_...;
# here the one after them all: a finished run resumed.
def test_kill_after_the_summary_then_resume_gives_the_same_records(tmp_path, straight):
    out = tmp_path / "run"
    run_killed(tmp_path, "after_summary", STEPS, *END, f"train.output_dir={out}")
    assert (out / "summary.json").exists()
    run_cli(*END, "train.resume=auto", f"train.output_dir={out}")
    assert_same_run(straight, out)
    assert not [p for p in out.rglob("*.tmp")], "no temporary file is left"


def test_first_start_after_an_attempt_killed_before_its_first_checkpoint(tmp_path, straight):
    """What a launcher's restart finds: metrics rows, no checkpoint.  resume=auto starts over."""
    out = tmp_path / "run"
    run_killed(tmp_path, "before_first_checkpoint", 0, *END, f"train.output_dir={out}")
    assert metrics(out) and not list_checkpoints(str(out))
    proc = run_cli(*END, "train.resume=auto", f"train.output_dir={out}")
    assert "no checkpoint in" in proc.stderr and "starting from step 0" in proc.stderr
    assert_same_run(straight, out)
    # a fresh dir with resume=auto starts too
    run_cli(*QUICK, "train.max_steps=2", "train.resume=auto", f"train.output_dir={tmp_path}/fresh")
    # ... but a finished run without checkpoints is not silently replaced
    (tmp_path / "fresh" / "checkpoints").rename(tmp_path / "moved")
    assert_bad_input(
        run_cli(*QUICK, "train.resume=auto", f"train.output_dir={tmp_path}/fresh", check=False),
        "already holds a run",
        "summary.json",
    )


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, straight):
    """A kill during an append leaves half a row; resume drops it and logs every row once."""
    out = tmp_path / "run"
    run_cli(*END, "train.max_steps=9", f"train.output_dir={out}")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 10, "epoch": 1.0, "loss": 2.3')  # torn: no end, no newline
    run_cli(*END, "train.resume=auto", f"train.output_dir={out}")
    straight_steps = [r for r in rows_without_timing(straight) if "test_acc" not in r]
    assert [r for r in rows_without_timing(out) if "test_acc" not in r] == straight_steps
    assert weights(out)[1].keys() == weights(straight)[1].keys()
    assert all(torch.equal(weights(out)[1][k], weights(straight)[1][k]) for k in weights(out)[1])
    # a broken row in the middle is not a torn append: refused, naming the line
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert_bad_input(
        run_cli(*END, "train.max_steps=20", "train.resume=auto", f"train.output_dir={out}", check=False),
        "line 3 is not a JSON object",
    )


# -- safe loading through the CLI -----------------------------------------------------------
EVIL = textwrap.dedent("""
    import sys, torch
    class Payload:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % sys.argv[2],))
    torch.save({"format": 1, "model": {"w": torch.ones(2)}, "evil": Payload()}, sys.argv[1])
""")


def evil_file(path, marker):
    subprocess.run([sys.executable, "-c", EVIL, str(path), str(marker)], check=True)
    return path


def test_malicious_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "marker"
    # as train.resume=PATH, under either name
    for name in ("evil.pt", "evil.safetensors"):
        path = evil_file(tmp_path / name, marker)
        proc = run_cli(*QUICK, f"train.resume={path}", f"train.output_dir={tmp_path}/out_{name}", check=False)
        assert_bad_input(proc, name, "cannot be read", "pickle")
        assert not (tmp_path / f"out_{name}").exists()
    # dropped into checkpoints/ as the newest, for resume=auto: skipped with a warning, left in place
    out = tmp_path / "run"
    run_cli(*QUICK, "train.max_steps=3", f"train.output_dir={out}")
    planted = evil_file(out / "checkpoints" / "step_000000099.safetensors", marker)
    proc = run_cli(*QUICK, "train.max_steps=5", "train.resume=auto", f"train.output_dir={out}")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_000000099.safetensors" in warnings[0] and "step_000000003" in warnings[0]
    assert planted.exists() and summary(out)["steps"] == 5
    assert not marker.exists(), "code from the checkpoint ran"


# -- settings that change what a step is ---------------------------------------------------
def test_resume_refuses_changed_batch_or_data_unless_allowed(tmp_path):
    out = tmp_path / "run"
    run_cli(*QUICK, "train.max_steps=3", f"train.output_dir={out}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert_bad_input(
        run_cli(*QUICK, "train.max_steps=6", "train.batch_size=64", "train.resume=auto", f"train.output_dir={out}",
                check=False),
        "train.batch_size=32 in the checkpoint, 64 now",
        "train.resume_allow_changes=[train.batch_size]",
    )  # fmt: skip
    assert_bad_input(
        run_cli(*QUICK, "train.seed=5", "data.train_limit=512", "train.resume=auto", f"train.output_dir={out}",
                check=False),
        "train.seed=0 in the checkpoint, 5 now",
        "data.train_limit=1024 in the checkpoint, 512 now",
    )  # fmt: skip
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    proc = run_cli(
        *QUICK,
        "train.max_steps=6",
        "train.batch_size=64",
        "train.resume=auto",
        "train.resume_allow_changes=[train.batch_size]",
        f"train.output_dir={out}",
    )
    assert "resumed from" in proc.stdout and summary(out)["steps"] == 6


def test_resume_from_a_directory_says_so(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert_bad_input(
        run_cli(*QUICK, f"train.resume={run_dir}", f"train.output_dir={tmp_path}/out", check=False),
        str(run_dir),
        "is a directory, not a checkpoint file",
    )


def test_unreadable_newest_checkpoint_falls_back_with_a_warning(tmp_path, straight):
    out = tmp_path / "run"
    run_killed(tmp_path, "after_step_checkpoint", STEPS, *END, f"train.output_dir={out}")
    newest = latest_checkpoint(out)
    assert newest.name == "step_000000014.safetensors"
    newest.write_bytes(newest.read_bytes()[:4096])  # a disk error, a bad copy ...
    proc = run_cli(*END, "train.resume=auto", f"train.output_dir={out}")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, proc.stderr[-2000:]
    assert "step_000000014.safetensors" in warnings[0] and "resuming from step_000000010.safetensors" in warnings[0]
    assert_same_run(straight, out)
    # named explicitly, an unreadable checkpoint is refused
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert_bad_input(
        run_cli(*END, f"train.resume={bad}", f"train.output_dir={tmp_path}/other", check=False), "cannot be read"
    )


# -- the NaN message -----------------------------------------------------------------------
def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    proc = run_cli(
        *QUICK, "optim.lr=1e6", "train.max_steps=30", "train.log_every=1", f"train.output_dir={tmp_path}", check=False
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
    assert len(errors) == 1 and "not finite" in errors[0]
    assert "No checkpoint was written yet" in errors[0] and not list_checkpoints(str(tmp_path))


# -- one run per output dir ------------------------------------------------------------------
def test_two_runs_into_one_dir(tmp_path):
    """Started together, one run gets the dir, the other exits 2 naming the holder; the
    winner's records are its own (every step once); the lock goes when the winner ends."""
    out = tmp_path / "run"
    args = [*QUICK, "train.epochs=1000", "train.log_every=1", f"train.output_dir={out}"]  # runs until stopped
    a, b = start_cli(1, *args), start_cli(1, *args)
    try:
        deadline = time.time() + 240
        while a.poll() is None and b.poll() is None:
            assert time.time() < deadline, "both runs are training into one dir"
            time.sleep(0.1)
        loser, winner = (a, b) if a.poll() is not None else (b, a)
        _, err = loser.communicate()
        assert_bad_input(
            subprocess.CompletedProcess(loser.args, loser.returncode, "", err),
            f"train.output_dir '{out}' is in use by another run",
            f"pid {winner.pid} on host {socket.gethostname()}",
        )
        wait_for_step(winner, out, 3)
        for extra in ("train.resume=auto", "train.overwrite=true"):  # neither may take it over
            assert winner.poll() is None
            assert_bad_input(run_cli(*args, extra, check=False), "in use by another run", f"pid {winner.pid}")
        assert winner.poll() is None
        winner.send_signal(signal.SIGTERM)
        winner.communicate(timeout=120)
        assert winner.returncode == 128 + signal.SIGTERM
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    steps = [r["step"] for r in metrics(out) if "test_acc" not in r]
    assert steps == list(range(1, len(steps) + 1)), "every step logged once, by one run"
    assert not (out / ".lock").exists(), "released on exit"


# -- unusable output dirs ----------------------------------------------------------------------
def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:100]})")


@pytest.fixture
def mounts(tmp_path):
    made = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        mount_tmpfs(where, options)
        made.append(where)
        return where

    yield mount
    for where in reversed(made):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("case", ["a regular file", "under a regular file", "checkpoints is a file", "read-only"])
def test_unusable_output_dir_is_refused_before_the_first_step(tmp_path, mounts, case):
    if case == "a regular file":
        out = tmp_path / "out"
        out.write_text("my notes")
        needles = [f"'{out}' is a file, not a directory"]
    elif case == "under a regular file":
        (tmp_path / "file").write_text("my notes")
        out = tmp_path / "file" / "run"
        needles = [f"'{out}' cannot be created", "Not a directory"]
    elif case == "checkpoints is a file":
        out = tmp_path / "out"
        out.mkdir()
        (out / "checkpoints").write_text("my notes")
        needles = ["'checkpoints' is a file"]
    else:
        out = mounts("ro", "ro,size=1m") / "run"
        needles = [f"'{out}' cannot be created", "read-only"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert_bad_input(run_cli(*QUICK, "train.max_steps=3", f"train.output_dir={out}", check=False), *needles)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# -- a full disk ---------------------------------------------------------------------------------
def assert_write_failure(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "[rank" not in proc.stderr and 'Traceback (most recent call last):\n  File "/' not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_full_disk_during_a_checkpoint_keeps_the_previous_ones(tmp_path, mounts):
    """A 6 MiB tmpfs holds two checkpoints of the tiny net (2.7 MB each), not three."""
    out = mounts("small", "size=6m") / "run"
    args = [*QUICK, "train.max_steps=12", "train.log_every=1", "train.checkpoint_every=2", f"train.output_dir={out}"]
    proc = run_cli(*args, check=False)
    line = assert_write_failure(
        proc,
        f"cannot write '{out}/checkpoints/step_000000006.safetensors'",
        "the disk is full (ENOSPC",
        f"The newest checkpoint, {out}/checkpoints/step_000000004.safetensors, is kept",
    )
    assert "Traceback" not in proc.stderr, line
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_000000002.safetensors", "step_000000004.safetensors"], "no temporary file left"
    assert read(out / "checkpoints" / names[-1])["position"]["step"] == 4
    # space freed: the run continues from step 4 and finishes
    subprocess.run(["mount", "-o", "remount,size=32m", str(out.parent)], check=True)
    run_cli(*args, "train.resume=auto")
    assert summary(out)["steps"] == 12


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.parametrize("nprocs", [1, 2])
def test_write_failure_is_one_line_on_every_placement(tmp_path, nprocs):
    """Without root: a file-size limit (ulimit -f) makes the first checkpoint write fail
    (EFBIG).  Every rank stops (none waits for the write), one line, exit 1."""
    out = tmp_path / "run"
    split = ["--split-mode", "ddp"] if nprocs == 2 else []
    cmd = launch_cmd(nprocs, *QUICK, *split, "train.max_steps=6", "train.checkpoint_every=3", f"train.output_dir={out}")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=cli_env(), cwd=ROOT, preexec_fn=_limit_file_size
    )
    if nprocs == 1:
        assert_write_failure(proc, "step_000000003.safetensors", "EFBIG", "No checkpoint was written yet")
    else:  # the launcher reports a failed worker as 1; each worker exits 1
        assert proc.returncode == 1 and "exitcode  : 1" in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
        assert len(errors) == 1 and "EFBIG" in errors[0], proc.stderr[-3000:]
        assert "[rank1]" not in proc.stderr and "[rank0]" not in proc.stderr
    assert not list((out / "checkpoints").iterdir())


# -- self-healing under the launcher ------------------------------------------------------
def test_launcher_restart_heals_a_killed_worker(tmp_path):
    """accelerate launch --max_restarts 1: rank 1 of a model-parallel run is SIGKILLed after
    step 8; the launcher restarts both workers, which resume (train.resume=auto) and finish
    with the uninterrupted run's weights, bitwise."""
    args = [*END, "train.checkpoint_every=3", "--split-mode", "model-parallel", "train.resume=auto"]
    straight, healed = tmp_path / "straight", tmp_path / "healed"
    run_cli(*args, f"train.output_dir={straight}", nprocs=2)
    restarts = ["--max_restarts", "1", "--monitor_interval", "1"]
    cmd = killer_cmd(tmp_path, 2, "after_step", 8, *args, f"train.output_dir={healed}", rank=1, extra_launch=restarts)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    # The launcher reports the first worker it saw fail: rank 1, SIGKILLed, or rank 0, which
    # ends with its one line as soon as its peer's connection breaks -- a race between the
    # launcher's monitor and gloo that distalex does not decide.  Either way it restarted both.
    failures = re.findall(r"exitcode: (-?\d+)\) local_rank: (\d+)", out)
    assert failures and failures[0] in {("-9", "1"), ("1", "0")}, (failures, out[-3000:])
    resumed = [line for line in out.splitlines() if "distalex: resumed from" in line]
    assert len(resumed) == 1 and "launcher restart 1" in resumed[0], resumed
    assert "step_000000006.safetensors at step 6" in resumed[0]
    (sa, wa), (sb, wb) = weights(straight), weights(healed)
    assert sa == sb == STEPS and all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [r["step"] for r in metrics(healed) if "test_acc" not in r]
    assert steps == list(range(1, STEPS + 1))
    assert summary(healed)["test_acc"] == summary(straight)["test_acc"]
