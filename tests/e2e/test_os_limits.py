"""Paths and text the OS refuses, and sizes the machine cannot hold: one line, exit 2, nothing
written -- checked once at start-up for every path key, every config string and every
command-line path, instead of an OSError / UnicodeEncodeError / allocation traceback later."""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers import PREDICT, QUICK, ROOT, TRAIN, assert_bad_input, cli_env, launch_cmd, run_cli

REFUSAL_S = 60


def _run_bytes(*args: bytes, env=None) -> subprocess.CompletedProcess:
    """The CLI with raw bytes arguments (what a shell passes for a non-UTF-8 file name)."""
    cmd = [os.fsencode(a) for a in launch_cmd(1, script=TRAIN)] + list(args)
    proc = subprocess.run(cmd, capture_output=True, timeout=REFUSAL_S, env=env or cli_env(), cwd=ROOT)
    proc.stdout = proc.stdout.decode("utf-8", "replace")
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    return proc


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda t: [f"train.output_dir={t}/{'c' * 300}/run"], ["train.output_dir", "300 bytes", "NAME_MAX"]),
        (lambda t: [f"train.output_dir={t}/" + "/".join(["d" * 200] * 21)], ["train.output_dir", "PATH_MAX"]),
    ],
    ids=["component-300", "output-dir-beyond-PATH_MAX"],
)  # the other path keys and --config: unit/test_path_limits.py (the same check, without a process each)
def test_paths_the_os_refuses_are_one_line(tmp_path, make, needles):
    extra = make(tmp_path)
    default_out = [] if any(e.startswith("train.output_dir") for e in extra) else [f"train.output_dir={tmp_path}/o"]
    proc = run_cli(*QUICK, *default_out, *extra, check=False, timeout=REFUSAL_S)
    assert_bad_input(proc, *needles)
    assert list(tmp_path.iterdir()) == []


def test_non_utf8_bytes_in_an_override_or_the_output_dir_are_one_line(tmp_path):
    out = os.fsencode(tmp_path) + b"/run\xff"
    proc = _run_bytes(*[a.encode() for a in QUICK], b"train.output_dir=" + out)
    assert_bad_input(proc, "train.output_dir", "0xff", "not UTF-8")
    # The same bytes arriving through an interpolation of the environment.
    env = {**cli_env(), "DISTALEX_ODD_DIR": out}
    proc = _run_bytes(*[a.encode() for a in QUICK], b"train.output_dir=${oc.env:DISTALEX_ODD_DIR}", env=env)
    assert_bad_input(proc, "config key 'train.output_dir'", "0xff")
    assert list(tmp_path.iterdir()) == []


def test_serving_command_paths_the_os_refuses_are_one_line(tmp_path):
    long_ckpt = f"{tmp_path}/{'k' * 300}.safetensors"
    assert_bad_input(
        run_cli(long_ckpt, "x.png", script=PREDICT, check=False, timeout=REFUSAL_S), "checkpoint", "NAME_MAX"
    )
    proc = subprocess.run(
        [os.fsencode(a) for a in launch_cmd(1, script=PREDICT)] + [b"ck.safetensors", b"\xffimg.png"],
        capture_output=True,
        timeout=REFUSAL_S,
        env=cli_env(),
        cwd=ROOT,
    )
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and stderr.count("distalex: error:") == 1 and "IMAGE" in stderr and "0xff" in stderr


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("data.image_size=100000", ["data.image_size=100000", "cannot fit", "GiB", "activations"]),
    ],
)  # other keys and sizes: unit/test_bounded_reads.py
def test_a_step_too_large_for_the_machine_is_refused_with_the_numbers(tmp_path, override, needles):
    proc = run_cli(*QUICK, override, f"train.output_dir={tmp_path}/run", check=False, timeout=REFUSAL_S)
    assert_bad_input(proc, *needles)
    assert not (tmp_path / "run").exists()
