"""The SLURM launcher (launch/slurm.sbatch -> launch/slurm_node.py): host lists,
the command each node runs, refusals, and a 2-"node" job on one host run from the
variables an allocation sets."""

import importlib.util
import shlex
import subprocess
import sys

import pytest

from helpers import QUICK, ROOT, cli_env, free_port, metrics, summary

SCRIPT = ROOT / "launch" / "slurm_node.py"
spec = importlib.util.spec_from_file_location("distalex_slurm_node", SCRIPT)
slurm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(slurm)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node7", ["node7"]),
        ("gpu-[07-09]", ["gpu-07", "gpu-08", "gpu-09"]),
        ("a[1,3-4],b2", ["a1", "a3", "a4", "b2"]),
        ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
        ("x[098-101]", ["x098", "x099", "x100", "x101"]),
    ],
)
def test_nodelist_expansion(nodelist, hosts):
    assert slurm.expand_nodelist(nodelist) == hosts


def allocation(**extra):
    env = {"SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8"}
    env.update(extra)
    return env


def node_command(env):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--split-mode", "hybrid", "train.max_steps=3"],
        capture_output=True,
        text=True,
        env={**cli_env(), **env},
        cwd=ROOT,
    )
    return proc


def test_each_node_renders_its_launcher_command():
    cmds = []
    for node in (0, 1):
        proc = node_command(allocation(SLURM_NODEID=str(node)))
        assert proc.returncode == 0, proc.stderr
        cmds.append(shlex.split(proc.stdout.strip()))
    for node, cmd in enumerate(cmds):
        flags = dict(zip(cmd, cmd[1:], strict=False))  # each flag -> the word after it
        assert flags["--num_machines"] == "2" and flags["--num_processes"] == "16"  # 2 nodes x 8 GPUs
        assert flags["--machine_rank"] == str(node)
        assert flags["--main_process_ip"] == "gpu-07"  # the allocation's first node
        assert flags["--main_process_port"] == str(20000 + 4242 % 20000)  # the same on every node
        assert cmd[-4:] == [str(ROOT / "launch" / "train.py"), "--split-mode", "hybrid", "train.max_steps=3"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
        (
            {"SLURM_NNODES": "3", "SLURM_NODEID": "0"},
            "SLURM_NNODES=3 but SLURM_JOB_NODELIST 'gpu-[07-08]' names 2 hosts",
        ),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is not below SLURM_NNODES=2"),
        ({"SLURM_NODEID": "x"}, "SLURM_NODEID='x': expected an integer >= 0"),
        ({"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu-[07-08"}, "unbalanced '['"),
    ],
)
def test_bad_allocation_is_one_line_exit_2(env, message):
    proc = node_command(allocation(**env))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slurm_node: error: ") and message in lines[0], proc.stderr


def test_two_nodes_run_hybrid_to_the_end(tmp_path):
    """Two "nodes" of one process each on this host, started as srun would start
    them: the same command, the allocation's variables, a different SLURM_NODEID."""
    args = [*QUICK, "--split-mode", "hybrid", "train.max_steps=4", "train.log_every=2", f"train.output_dir={tmp_path}"]
    base = cli_env(
        SLURM_JOB_NODELIST="localhost,127.0.0.1",
        SLURM_NNODES="2",
        SLURM_JOB_ID="77",
        MASTER_PORT=str(free_port()),
        DISTALEX_PROCS_PER_NODE="1",
        PYTHON=sys.executable,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**base, "SLURM_NODEID": str(node)},
            cwd=ROOT,
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    s = summary(tmp_path)
    assert (s["split_mode"], s["world_size"], s["fc_shards"], s["steps"]) == ("hybrid", 2, 2, 4)
    assert [r["step"] for r in metrics(tmp_path) if r.get("hybrid_bytes_per_step", 0) > 0] == [2, 4]
