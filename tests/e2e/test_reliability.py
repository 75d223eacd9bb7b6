"""Guarantees 5 and 6: exact resume after SIGKILL, atomic checkpoints, graceful
SIGTERM, the NaN guard, and a dead rank ending the job (real subprocesses)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from distalex.training.checkpoint import list_checkpoints, read

from helpers import (
    EXACT,
    EXACT_STEPS,
    QUICK,
    ROOT,
    SPLIT_MODES,
    cli_env,
    kill_at_write_cmd,
    kill_job,
    latest_checkpoint,
    launch_cmd,
    png_size,
    rows_without_timing,
    run_cli,
    shared_run,
    signal_at_step_cmd,
    start_cli,
    step_losses,
    summary,
    wait_for_step,
    worker_pids,
)

STEPS = 14
# Dropout stays on: exact resume must restore every rank's RNG stream too.
RESUMABLE = QUICK + [
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "data.train_limit=320",
]  # 10 steps per epoch: the run crosses an epoch boundary


def final_weights(run_dir):
    state = read(latest_checkpoint(run_dir))
    assert state["position"]["step"] == STEPS
    return state["model"]


# -- a kill at any instant, in every placement ------------------------------------------------
# The reference runs are the placement comparisons' (shared_run: computed once per session).
# Pipeline: test_pipeline_training's 1f1b run of 4 micro-batches (the defaults, spelled out).
KILL_PLACEMENTS = {
    **SPLIT_MODES,
    "pipeline": (2, [*SPLIT_MODES["pipeline"][1], "pipeline.schedule=1f1b", "pipeline.microbatches=4"]),
}
# EXACT: 5 steps per epoch, 8 steps.  A step checkpoint every 4 steps puts one in the middle of
# epoch 1 at the last step, so step 8 makes every write a step can make, in this order: its
# step row, its step checkpoint, the evaluation (epoch) row, the curves, the checkpoint
# carrying that row, the summary.  The killed run is resumed from the middle of an epoch
# (every rank's running figures) and from a checkpoint older than rows already written.
KILL_EVERY = ["train.checkpoint_every=4", "train.keep_checkpoints=2"]
# A kill between every pair of successive writes of step 8, chained in one run: killed at
# the first instant, resumed and killed at the next, ..., then resumed to its end.
KILL_CHAIN = (
    "row@8",  # step row | step checkpoint (resumes from step 5, the end of epoch 0)
    "checkpoint@8",  # step checkpoint | epoch row (resumes in the middle of epoch 1)
    "epoch_row@8",  # epoch row | curves (during the redraw; resumes from the step checkpoint)
    "curves@8",  # curves | the epoch's checkpoint
    "summary_tmp",  # the epoch's checkpoint | summary (its temporary file written, not renamed)
)


@pytest.mark.parametrize("mode", list(KILL_PLACEMENTS))
def test_kill_at_every_instant_of_a_step_then_resume_gives_the_uninterrupted_records(tmp_path_factory, tmp_path, mode):
    """SIGKILL between every two writes of a step, in every placement: the resumed run's
    metrics rows (timings aside), final weights and summary are the uninterrupted run's."""
    assert_killed_chain_gives_the_uninterrupted_run(tmp_path_factory, tmp_path, mode, [], KILL_CHAIN)


def test_a_step_row_resumed_mid_interval_covers_every_step_of_its_interval(tmp_path_factory, tmp_path):
    """Killed after a checkpoint between two step rows (log_every=4, a checkpoint at step 3):
    the resumed row of step 4 averages steps 1-4 of both replicas and counts the exchange bytes
    of all four steps, as the uninterrupted run's does (hybrid: two replicas, its own exchanges)."""
    every = ["train.log_every=4", "train.checkpoint_every=3"]
    assert_killed_chain_gives_the_uninterrupted_run(tmp_path_factory, tmp_path, "hybrid", every, ("checkpoint@3",))


def assert_killed_chain_gives_the_uninterrupted_run(tmp_path_factory, tmp_path, mode, extra, chain):
    nprocs, split = KILL_PLACEMENTS[mode]
    straight = shared_run(tmp_path_factory, *EXACT, *split, *extra, nprocs=nprocs)
    out = tmp_path / "killed"
    args = [*EXACT, *split, *KILL_EVERY, *extra, "train.resume=auto", f"train.output_dir={out}"]
    for instant in chain:
        proc = subprocess.run(
            kill_at_write_cmd(nprocs, instant, *args),
            capture_output=True,
            text=True,
            timeout=300,
            env=cli_env(),
            cwd=ROOT,
        )
        # one process: killed by the signal; under accelerate launch the launcher reports it
        killed = proc.returncode == -signal.SIGKILL or nprocs > 1 and "Signal 9 (SIGKILL)" in proc.stderr
        assert killed, (instant, proc.returncode, proc.stderr[-3000:])
        assert (out / ".lock").exists()  # the dead run's lock file stays; its lock went with it
    assert not (out / "summary.json").exists()
    run_cli(*args, nprocs=nprocs)
    a, b = read(latest_checkpoint(straight)), read(latest_checkpoint(out))
    assert a["position"]["step"] == b["position"]["step"] == EXACT_STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "final weights differ"
    assert rows_without_timing(out) == rows_without_timing(straight)
    sa, sb = summary(straight), summary(out)
    for key in ("loss", "train_acc", "test_acc", "test_top5", "train_examples", "steps", "epochs"):
        assert sb.get(key) == sa.get(key), (key, sa.get(key), sb.get(key))
    assert not [p for p in out.rglob("*.tmp")], "the killed writers' temporary files are removed"
    png_size(out / "curves.png")


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    run_cli(*QUICK, "train.max_steps=2", f"train.output_dir={tmp_path}/run")
    real = latest_checkpoint(tmp_path / "run")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from distalex.training import checkpoint
        saved = checkpoint.read({str(real)!r})
        step = saved["position"]["step"]
        checkpoint.write(saved, {str(out)!r}, step, keep=3)
        saved["model"] = {{k: v + 1 for k, v in saved["model"].items()}}
        saved["position"]["step"] = step + 1
        real_fsync = os.fsync
        def dying_fsync(fd):  # the new file's bytes are written, it is not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = dying_fsync
        checkpoint.write(saved, {str(out)!r}, step + 1, keep=3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(str(out))] == [real.name]  # only the one written before
    assert any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())  # the killed writer's
    a, b = read(real)["model"], read(list_checkpoints(str(out))[0])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_and_resume_continues(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli(*RESUMABLE, f"train.output_dir={straight}")
    # SIGTERM right after step 5 (not after a sleep: a loaded machine could finish the run first).
    cmd = signal_at_step_cmd(
        tmp_path, 1, 5, signal.SIGTERM, *RESUMABLE, "train.checkpoint_every=1000", f"train.output_dir={stopped}"
    )
    proc = start_cli(1, cmd=cmd)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "train.resume=auto" in err
    state = read(latest_checkpoint(stopped))
    assert state["position"]["step"] == max(step_losses(stopped))  # the step it finished
    run_cli(*RESUMABLE, "train.checkpoint_every=1000", "train.resume=auto", f"train.output_dir={stopped}")
    a, b = final_weights(straight), final_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_a_two_process_job(tmp_path):
    proc = start_cli(
        2, *RESUMABLE, "--split-mode", "ddp", "train.checkpoint_every=1000", f"train.output_dir={tmp_path}"
    )
    wait_for_step(proc, tmp_path, 4)
    os.killpg(proc.pid, signal.SIGTERM)  # what a cluster scheduler does on preemption
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped_at = read(latest_checkpoint(tmp_path))["position"]["step"]
    assert 4 <= stopped_at < STEPS
    run_cli(*RESUMABLE, "--split-mode", "ddp", "train.resume=auto", f"train.output_dir={tmp_path}", nprocs=2)
    assert read(latest_checkpoint(tmp_path))["position"]["step"] == STEPS


def test_nan_guard_stops_and_keeps_good_checkpoint(tmp_path):
    proc = run_cli(
        *QUICK,
        "optim.lr=1e6",
        "train.max_steps=40",
        "train.checkpoint_every=1",
        "train.log_every=1",
        f"train.output_dir={tmp_path}",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
    assert len(errors) == 1 and "not finite" in errors[0], proc.stderr[-2000:]
    bad_step = int(re.search(r"(?:at|after) step (\d+)", errors[0]).group(1))
    assert "Traceback" not in proc.stderr
    ckpts = list_checkpoints(str(tmp_path))
    assert ckpts, "the good checkpoints before the blow-up are kept"
    assert f"The newest checkpoint, {ckpts[-1]}, is kept" in errors[0]  # names what exists
    state = read(ckpts[-1])
    assert state["position"]["step"] <= bad_step
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_dead_rank_ends_the_job_within_timeout(tmp_path):
    timeout_s = 20
    proc = start_cli(
        2,
        *QUICK,
        "--split-mode",
        "ddp",
        "train.max_steps=100000",
        "train.log_every=1",
        f"train.timeout_s={timeout_s}",
        f"train.output_dir={tmp_path}",
    )
    try:
        wait_for_step(proc, tmp_path, 3)
        victims = worker_pids(tmp_path, 1)
        assert len(victims) == 1
        killed_at = time.time()
        os.kill(victims[0], signal.SIGKILL)
        proc.communicate(timeout=timeout_s + 60)
        assert proc.returncode != 0
        assert time.time() - killed_at <= timeout_s + 60
        assert not worker_pids(tmp_path, 0), "rank 0 must not outlive the job"
    finally:
        kill_job(proc, tmp_path, signal.SIGKILL)


def assert_one_line_failure(stderr: str, *needles) -> None:
    """The surviving distalex processes end with one ``distalex: error:`` line between them (the
    main process's) and no traceback; the launcher's own report of a failed worker (torch
    elastic's ChildFailedError) is not distalex's and is ignored."""
    ours = stderr.split("Traceback (most recent call last):", 1)[0] if "ChildFailedError" in stderr else stderr
    launcher = stderr[len(ours) :]
    errors = [line for line in stderr.splitlines() if line.startswith("distalex: error:")]
    assert len(errors) == 1, stderr[-5000:]
    assert all(n in errors[0] for n in needles), errors[0]
    assert "Traceback" not in ours and "distalex/" not in launcher, stderr[-5000:]


SURVIVORS_MARGIN_S = 30  # past train.timeout_s: the failure reaching every survivor, their exit


def test_hung_rank_in_a_2x2_mesh_ends_the_job_within_timeout(tmp_path):
    """A rank that hangs (SIGSTOP: alive, sockets open) in a 2 replicas x 2 towers run.  Its
    tower partner waits in a tower exchange, the other tower's replicas in DDP's all-reduce:
    only the tower and replica groups' own timeouts can end the job, so they must be
    train.timeout_s, not the backend's 30 min.  The stop-flag check (world group) is made
    rare so that no rank is rescued by the world group's timeout."""
    timeout_s = 20
    proc = start_cli(
        4,
        *QUICK,
        "--split-mode",
        "model-parallel",
        "train.max_steps=100000",
        "train.log_every=1",
        "train.stop_check_every=100000",
        f"train.timeout_s={timeout_s}",
        f"train.output_dir={tmp_path}",
    )
    try:
        wait_for_step(proc, tmp_path, 3)
        victims = worker_pids(tmp_path, 3)
        assert len(victims) == 1
        stopped_at = time.time()
        os.kill(victims[0], signal.SIGSTOP)
        deadline = stopped_at + timeout_s + SURVIVORS_MARGIN_S

        def survivors():
            return {pid for rank in range(4) for pid in worker_pids(tmp_path, rank)} - set(victims)

        while survivors() and time.time() < deadline:
            time.sleep(0.2)
        assert not survivors(), "the survivors must end on the groups' timeouts"
        # The stopped rank cannot act on the launcher's SIGTERM; the launcher SIGKILLs it after a
        # grace of its own (30 s), which is the launcher's and not what is tested: do it now.
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0
        # The main process's one line (the others' timeouts are not printed), no traceback.
        assert_one_line_failure(stderr, "distalex: error: a peer process ", "(gloo: ")
        assert not any(worker_pids(tmp_path, r) for r in range(4)), "no rank may outlive the job"
    finally:
        kill_job(proc, tmp_path, signal.SIGKILL)  # SIGKILL ends a stopped process too


def test_sigterm_stops_every_rank_at_an_agreed_check_step_and_resumes_exactly(tmp_path):
    """The stop flag is checked every train.stop_check_every steps, at the same steps on every
    rank: the stop happens after such a step, with a checkpoint that every rank took part in,
    and the resumed run ends with the uninterrupted run's weights and losses."""
    every = 3
    args = [*RESUMABLE, *SPLIT_MODES["model-parallel"][1], "train.checkpoint_every=1000"]
    args.append(f"train.stop_check_every={every}")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli(*args, f"train.output_dir={straight}", nprocs=2)
    proc = start_cli(2, *args, f"train.output_dir={stopped}")
    wait_for_step(proc, stopped, 4)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    at = read(latest_checkpoint(stopped))["position"]["step"]
    assert at % every == 0 and 4 <= at < STEPS, at
    run_cli(*args, "train.resume=auto", f"train.output_dir={stopped}", nprocs=2)
    a, b = final_weights(straight), final_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert step_losses(stopped) == step_losses(straight)


def device_env(device: str) -> dict:
    """cpu: the suite's pinned environment; cuda: the same with the GPU left visible."""
    env = cli_env()
    if device == "cuda":
        env.pop("CUDA_VISIBLE_DEVICES")
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return env


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_deterministic_resume_from_a_middle_checkpoint_is_bitwise_equal(tmp_path, device):
    """train.deterministic=true (with LRN, the op whose torch kernel has no deterministic
    CUDA backward): a run resumed from a checkpoint in the middle of an uninterrupted run
    ends with exactly its weights.  The resumed copy is the run dir as a kill right after
    that checkpoint leaves it (later checkpoints gone, metrics rows trimmed on resume)."""
    import shutil

    args = [*RESUMABLE, "train.deterministic=true", "model.lrn=true", "train.keep_checkpoints=100"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    env = device_env(device)
    proc = subprocess.run(
        launch_cmd(1, *args, f"train.output_dir={straight}"), capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((straight / "summary.json").read_text())
    assert (s["deterministic"], s["cudnn_benchmark"]) == (True, False)
    assert (s["device"] == "cpu") == (device == "cpu")
    shutil.copytree(straight, resumed)
    middle = 6
    for path in list_checkpoints(str(resumed)):
        if read(path)["position"]["step"] > middle:
            path.unlink()
    (resumed / "summary.json").unlink()
    assert read(latest_checkpoint(resumed))["position"]["step"] == middle
    proc = subprocess.run(
        launch_cmd(1, *args, "train.resume=auto", f"train.output_dir={resumed}"),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert step_losses(resumed) == step_losses(straight)
