"""What a process of a job sees go wrong around it, as one line with the right exit status
(real CLI subprocesses): a bad launcher environment (exit 2, printed by every process, before
accelerate starts), a rendezvous nobody answers, a peer that hangs during evaluation (exit 1 on
the main process), Ctrl-C during start-up (exit 130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import ROOT, TINY, TRAIN, assert_bad_input, cli_env, free_port

QUICK_RUN = [
    "--config", TINY, "tracking.wandb=false", "tracking.plots=false", "train.progress=false",
    "data.train_limit=64", "data.test_limit=32", "train.batch_size=32", "train.max_steps=2",
]  # fmt: skip


def plain_env(**launcher) -> dict:
    """The CLI's environment with only the given launcher variables (none from outside)."""
    env = cli_env()
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(name, None)
    env.update(launcher)
    return env


def run_plain(out, launcher: dict, *extra, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TRAIN, *QUICK_RUN, *extra, f"train.output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=plain_env(**launcher),
        cwd=ROOT,
    )


# -- the launcher's environment ------------------------------------------------------------------
LAUNCHER_CASES = {
    "world_size_without_launcher": ({"WORLD_SIZE": "2", "RANK": "0"}, "but MASTER_ADDR and MASTER_PORT not set"),
    "world_size_not_a_number": ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' must be an integer"),
    "stale_rank_in_a_plain_shell": ({"RANK": "1"}, "RANK=1 but WORLD_SIZE is not set"),
    "negative_local_rank": ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be an integer"),
    "rank_beyond_world_size": (
        {"WORLD_SIZE": "2", "RANK": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
        "RANK=3 but WORLD_SIZE=2: ranks are 0..1",
    ),
}


@pytest.mark.parametrize("case", LAUNCHER_CASES)
def test_bad_launcher_environment_is_one_line_exit_2_on_any_rank(tmp_path, case):
    launcher, words = LAUNCHER_CASES[case]
    out = tmp_path / "run"
    proc = run_plain(out, launcher, timeout=60)
    assert_bad_input(proc, "launcher environment: ", words)  # printed though RANK may say 1
    assert not out.exists()


def test_stale_rank_is_refused_by_the_serving_commands_too(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "evaluate.py"), str(tmp_path / "none.safetensors")],
        capture_output=True,
        text=True,
        timeout=60,
        env=plain_env(RANK="1"),
        cwd=tmp_path,
    )
    assert_bad_input(proc, "RANK=1 but WORLD_SIZE is not set")


# -- a rendezvous nobody answers ---------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 0])
def test_refused_rendezvous_is_one_line_exit_1(tmp_path, rank):
    """No peer at all: rank 1 finds the port closed, rank 0 waits for clients that never come;
    each ends within train.timeout_s with one line (not torch's C++ backtraces)."""
    port = free_port()  # closed: nothing listens there
    launcher = {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    started = time.time()
    proc = run_plain(tmp_path / "run", launcher, "train.timeout_s=2", timeout=90)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "frame #" not in proc.stderr, proc.stderr[-3000:]
    assert time.time() - started < 60


# -- a peer that hangs during evaluation --------------------------------------------------------------
HANG_IN_EVALUATION = textwrap.dedent(
    """
    import os, signal, sys
    from distalex.training import trainer

    real = trainer.Trainer.evaluate

    def evaluate(self):
        if os.environ["RANK"] == "1":  # this rank hangs (alive, sockets open) as evaluation starts
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(self)

    trainer.Trainer.evaluate = evaluate
    from distalex.cli import main
    sys.exit(main())
    """
)


def test_peer_hanging_during_evaluation_is_one_line_exit_1_on_the_main_process(tmp_path):
    """Two ranks started by hand (env:// rendezvous, no launcher to kill anyone): rank 1 stops
    itself when evaluation starts; rank 0 waits train.timeout_s in evaluation's all-reduce, then
    ends with exit 1 and one line, not gloo's traceback."""
    script = tmp_path / "hang.py"
    script.write_text(HANG_IN_EVALUATION)
    port, timeout_s = free_port(), 10
    procs = []
    try:
        for rank in (0, 1):
            launcher = {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(script),
                        *QUICK_RUN,
                        "--split-mode",
                        "ddp",
                        f"train.timeout_s={timeout_s}",
                        f"train.output_dir={tmp_path / 'run'}",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=plain_env(**launcher),
                    cwd=ROOT,
                )  # fmt: skip
            )
        _, stderr = procs[0].communicate(timeout=150)
        assert procs[0].returncode == 1, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("distalex: error:")]
        assert len(errors) == 1, stderr[-3000:]
        assert errors[0].startswith(f"distalex: error: a peer process did not answer within {timeout_s} s (gloo: ")
        assert "Traceback" not in stderr, stderr[-3000:]
        assert procs[1].poll() is None  # still stopped: it was rank 0's timeout that ended rank 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
            p.communicate()


# -- Ctrl-C during start-up ---------------------------------------------------------------------------
def _has_mapped(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("moment", ["importing_torch", "building_the_run"])
def test_ctrl_c_during_start_up_is_one_line_exit_130(tmp_path, moment):
    """SIGINT at a known instant of the start-up: while torch is being imported (its library is
    mapped, so Python's own handler is installed and distalex's main() runs), or once the run
    prints its first line (building; the training loop may have begun, then the stop is graceful).
    Either way: exit 130, one ``distalex:`` line on stderr, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, TRAIN, *QUICK_RUN, "train.max_steps=1000", f"train.output_dir={tmp_path / 'run'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=plain_env(),
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 120
        if moment == "importing_torch":
            while not _has_mapped(proc.pid, "libtorch") and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
        else:
            proc.stdout.readline()  # "distalex: peak ..." while the run is built
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("distalex:")]
    assert len(lines) == 1 and lines[0].startswith("distalex: stopped by SIGINT"), stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]


def test_process_group_errors_become_one_line_and_others_keep_their_traceback():
    """The conversion itself, on the exceptions gloo and the store raise (their real texts)."""
    import torch.distributed as dist

    from distalex.errors import RendezvousFailure, RunFailure
    from distalex.parallel.launch import process_group_failure

    timed_out = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
        "20000ms for recv operation to complete"
    )
    got = process_group_failure(timed_out)
    assert isinstance(got, RunFailure) and str(got).startswith(
        "a peer process did not answer within 20 s (gloo: Timed out waiting 20000ms for recv operation to complete)"
    )
    reset = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:7910: "
        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
    )
    assert str(process_group_failure(reset)).startswith(
        "a peer process closed its connection (it ended or was killed) (gloo: Read error [127.0.0.1]:7910: "
        "Connection reset by peer); "
    )
    store = dist.DistStoreError("Timed out after 4 seconds waiting for clients. 1/2 clients joined.")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1234", WORLD_SIZE="2", RANK="0")
    try:
        got = process_group_failure(store)
    finally:
        for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
            os.environ.pop(name)
    assert isinstance(got, RendezvousFailure) and "could not meet at 127.0.0.1:1234" in str(got)
    for other in (RuntimeError("shape mismatch"), ValueError("gloo"), KeyError("x")):
        assert process_group_failure(other) is None  # a bug: its traceback is kept
