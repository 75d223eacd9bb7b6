"""Guarantee 1 (split-mode invariance), the single-device fallback, world-size
validation, two machines, and portable checkpoints - through the real CLI."""

import subprocess

import pytest
import torch

from distalex.config import load_config
from distalex.model.alexnet import AlexNet, count_parameters, spec_from_config
from distalex.parallel import hybrid
from distalex.parallel.comm import ddp_bytes_per_step, hybrid_bytes_per_step
from distalex.training.checkpoint import load_reference, read

from helpers import (
    EXACT,
    EXACT_STEPS,
    QUICK,
    SPLIT_MODES,
    TINY,
    assert_same_losses,
    cli_env,
    free_port,
    latest_checkpoint,
    launch_cmd,
    metrics,
    run_cli,
    shared_run,
    summary,
)

STEPS = EXACT_STEPS
SAME = EXACT  # fp32, dropout on, across an epoch boundary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    plan = {
        "single": SPLIT_MODES["single"],
        "ddp2": SPLIT_MODES["ddp"],
        "single_t2": (1, [*SPLIT_MODES["single"][1], "model.towers=2"]),
        "mp2": SPLIT_MODES["model-parallel"],
        "mp4": (4, ["--split-mode", "model-parallel"]),
        "hybrid2": SPLIT_MODES["hybrid"],
        "hybrid4_t2": (4, ["--split-mode", "hybrid", "model.towers=2"]),
        "fsdp2": SPLIT_MODES["fsdp"],
        "fsdp4_t2": (4, ["--split-mode", "fsdp", "model.towers=2"]),
    }
    return {name: shared_run(tmp_path_factory, *SAME, *args, nprocs=nprocs) for name, (nprocs, args) in plan.items()}


def test_ddp_follows_single(runs):
    assert_same_losses(runs["single"], runs["ddp2"])
    assert summary(runs["ddp2"])["world_size"] == 2 and summary(runs["ddp2"])["replicas"] == 2


def test_model_parallel_follows_single_with_towers(runs):
    assert_same_losses(runs["single_t2"], runs["mp2"])
    assert_same_losses(runs["single_t2"], runs["mp4"])
    s = summary(runs["mp4"])
    assert (s["world_size"], s["replicas"], s["towers"]) == (4, 2, 2)
    rows = [r for r in metrics(runs["mp2"]) if "tower_bytes_per_step" in r]
    assert rows and all(r["tower_bytes_per_step"] > 0 for r in rows)


def test_hybrid_follows_single(runs):
    """Data-parallel convolutions + model-parallel fc layers: the same trajectory as
    single (towers=1 at W=2, towers=2 at W=4), across an epoch boundary."""
    assert_same_losses(runs["single"], runs["hybrid2"])
    assert_same_losses(runs["single_t2"], runs["hybrid4_t2"])
    for name, world, towers in (("hybrid2", 2, 1), ("hybrid4_t2", 4, 2)):
        s = summary(runs[name])
        assert (s["split_mode"], s["world_size"], s["replicas"], s["fc_shards"], s["towers"]) == (
            "hybrid",
            world,
            world,
            world,
            towers,
        )
        assert s["epochs"] > 1  # crossed an epoch boundary
        # The exchanges' bytes, counted as they ran, are the shape arithmetic's; DDP
        # all-reduces only the replicated parameters (conv1..conv5, fc8's bias).
        overrides = [o for o in SAME if "=" in o] + [f"model.towers={towers}"]
        cfg = load_config(TINY, overrides, split_mode="hybrid")
        spec = spec_from_config(cfg)
        rows = [r for r in metrics(runs[name]) if "hybrid_bytes_per_step" in r]
        assert len(rows) == STEPS
        expected = sum(hybrid_bytes_per_step(spec, world, cfg.train.batch_size).values())
        assert all(r["hybrid_bytes_per_step"] == expected for r in rows)
        conv = ddp_bytes_per_step(hybrid.replicated_parameters(spec), world)
        assert all(r["ddp_bytes_per_step"] == conv for r in rows)
        assert conv + expected < ddp_bytes_per_step(count_parameters(AlexNet(spec)), world)  # fewer than ddp


def test_fsdp_follows_single(runs):
    """Fully sharded: the same trajectory as single (towers=1 at W=2, towers=2 at W=4)."""
    assert_same_losses(runs["single"], runs["fsdp2"])
    assert_same_losses(runs["single_t2"], runs["fsdp4_t2"])
    s = summary(runs["fsdp4_t2"])
    assert (s["split_mode"], s["world_size"], s["replicas"], s["towers"]) == ("fsdp", 4, 4, 2)
    rows = [r for r in metrics(runs["fsdp2"]) if "fsdp_bytes_per_step" in r]
    assert len(rows) == STEPS and all(r["fsdp_bytes_per_step"] > 0 and "ddp_bytes_per_step" not in r for r in rows)


def test_fsdp_holds_a_wth_of_what_ddp_holds(runs):
    """Parameters, gradients and momentum per process, as each process counted its own tensors at
    every logged step: fsdp at W processes holds 1/W of ddp's (up to dim-0 padding), ddp all of
    single's, and the summary carries the same figures."""
    keys = ("param_bytes", "grad_bytes", "optimizer_bytes")

    def held(run):
        rows = [r for r in metrics(run) if "train_acc" not in r]
        assert len(rows) == STEPS and all(all(r[k] > 0 for k in keys) for r in rows)
        assert {tuple(r[k] for k in keys) for r in rows} == {tuple(summary(run)[k] for k in keys)}
        return sum(summary(run)[k] for k in keys)

    single, ddp = held(runs["single"]), held(runs["ddp2"])
    assert ddp == single  # every replica holds the whole model
    for run, world, whole in (("fsdp2", 2, single), ("fsdp4_t2", 4, held(runs["single_t2"]))):
        assert whole / world <= held(runs[run]) <= whole / world * 1.05, run


def test_parameters_after_training_match_single(runs):
    """The weights themselves (not only the losses) agree after STEPS optimizer steps."""
    pairs = (
        ("single", "ddp2"),
        ("single_t2", "mp2"),
        ("single_t2", "mp4"),
        ("single", "hybrid2"),
        ("single_t2", "hybrid4_t2"),
        ("single", "fsdp2"),
        ("single_t2", "fsdp4_t2"),
    )
    for a, b in pairs:
        wa, wb = read(latest_checkpoint(runs[a]))["model"], read(latest_checkpoint(runs[b]))["model"]
        for name in wa:
            assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6), (a, b, name)


def test_checkpoints_round_trip_across_placements(runs, tmp_path):
    """mp -> single -> ddp -> hybrid -> fsdp -> mp: the weights come back bitwise, predictions identical."""
    start = latest_checkpoint(runs["mp2"])
    hops = [
        (1, ["--split-mode", "single", "model.towers=2"]),
        (2, ["--split-mode", "ddp", "model.towers=2"]),
        (2, ["--split-mode", "hybrid", "model.towers=2"]),
        (2, ["--split-mode", "fsdp", "model.towers=2"]),
        (2, ["--split-mode", "model-parallel"]),
    ]
    ckpt, accs = start, [summary(runs["mp2"])["test_acc"]]
    for i, (nprocs, args) in enumerate(hops):
        out = tmp_path / f"hop{i}"
        run_cli(*SAME, *args, f"train.resume={ckpt}", f"train.output_dir={out}", nprocs=nprocs)
        ckpt = latest_checkpoint(out)
        accs.append(summary(out)["test_acc"])
    assert len(set(accs)) == 1, accs  # the final evaluation travels in the checkpoint to every hop
    first, last = read(start)["model"], read(ckpt)["model"]
    assert all(torch.equal(first[k], last[k]) for k in first)
    x = torch.rand(16, 1, 67, 67)
    a, b = load_reference(str(start)).eval(), load_reference(str(ckpt)).eval()
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(("mode", "towers"), [("model-parallel", 2), ("hybrid", 1)])
def test_single_device_fallback_trains_with_notice(tmp_path, mode, towers):
    proc = run_cli(*QUICK, "--split-mode", mode, "train.max_steps=4", f"train.output_dir={tmp_path}")
    notices = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "single-device fallback" in line]
    assert len(notices) == 1 and notices[0].startswith(f"distalex: {mode} with 1 process"), notices
    s = summary(tmp_path)
    assert (s["split_mode"], s["world_size"], s["towers"], s["steps"]) == (mode, 1, towers, 4)


def test_world_size_not_multiple_of_towers(tmp_path):
    proc = run_cli(*QUICK, "--split-mode", "model-parallel", f"train.output_dir={tmp_path}", nprocs=3, check=False)
    assert proc.returncode != 0  # accelerate's launcher reports a failed worker as 1
    assert "exitcode: 2" in proc.stderr  # ... each worker exits 2 (bad input)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
    assert errors == [
        "distalex: error: model-parallel needs a world size that is a multiple of "
        "model.towers: W=3 processes, T=2 towers, 3 % 2 = 1"
    ]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_hybrid_world_size_that_does_not_divide_the_fc_units(tmp_path):
    # 3 processes, a global batch of 33 (divisible), 512 fc units at width 0.125 (not).
    args = (*QUICK, "--split-mode", "hybrid", "train.batch_size=33", f"train.output_dir={tmp_path}")
    proc = run_cli(*args, nprocs=3, check=False)
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
    assert errors == [
        "distalex: error: hybrid splits fc6/fc7's units over the processes: 512 units "
        "(model.width=0.125) are not divisible by W=3 processes (512 % 3 = 2)"
    ]
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_two_machines_train_model_parallel_together(tmp_path):
    port = free_port()
    args = [*SAME, "--split-mode", "model-parallel", f"train.output_dir={tmp_path}"]
    procs = []
    for machine in (0, 1):
        cmd = launch_cmd(2, *args)
        i = cmd.index("--num_processes")
        cmd[i + 1 : i + 4] = ["2", "--num_machines", "2"]  # 2 processes in all, one per machine
        j = cmd.index("--main_process_port")
        cmd[j + 1] = str(port)
        cmd[j:j] = ["--machine_rank", str(machine), "--main_process_ip", "127.0.0.1"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    s = summary(tmp_path)
    assert (s["world_size"], s["towers"], s["steps"]) == (2, 2, STEPS)
