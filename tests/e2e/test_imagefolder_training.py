"""End to end: the paper recipe (configs/paper_imagenet.yaml) on a small generated
ImageFolder trains through the real CLI in every placement -- single, ddp, model-parallel,
hybrid, pipeline (2 stages) and fsdp, 2 processes each -- with ten-crop evaluation and top-5
accuracy; the placements follow the same loss trajectory (docs/design.md, "Guarantees"),
also when stopped mid-epoch and resumed where the loader has a placement's own resume path
(model-parallel's shared decoding, a pipeline's label-only later stage; every placement's
resume on other data: tests/e2e/test_reliability.py); and a replica decodes each training file
once per epoch (file opens counted by an audit hook in every process, outside the product)."""

import collections
import os

import numpy as np
import pytest

from distalex.model.alexnet import AlexNetSpec
from distalex.parallel.comm import input_bytes_per_step

from helpers import PAPER, SPLIT_MODES, cli_env, make_folder, metrics, run_cli, step_losses, summary

CLASSES = 6  # >= 5: top-5 is reported (and not trivially 1.0)
N_TRAIN, N_VAL = 16, 6  # per class: 96 training images = 6 steps of 16
BATCH, EPOCHS = 16, 2
STEPS = EPOCHS * CLASSES * N_TRAIN // BATCH
# The paper's geometry (conv1 padding 2) at the smallest input it accepts.
IMAGE = AlexNetSpec(conv1_padding=2).smallest_image_size()
RESIZE = 72  # shorter side first, ~ the paper's 256/224 ratio
# Each multi-process placement, by its name here.
PLACEMENTS = {"ddp": "ddp", "mp": "model-parallel", "hybrid": "hybrid", "pipe": "pipeline", "fsdp": "fsdp"}
RESUMED = ("mp", "pipe")  # the placements whose batches the loader resumes in its own way
STOP = 4  # the step the resumed runs are first stopped at
RESUMED_ONLY = ("pipe",)  # its one run is the resumed one (a run fewer for the suite's time)


def args_for(root, out, classes, *extra):
    return [
        "--config",
        PAPER,
        f"data.root={root}",
        f"train.output_dir={out}",
        "model.width=0.125",
        f"data.image_size={IMAGE}",
        f"data.resize_size={RESIZE}",
        f"model.num_classes={classes}",
        f"train.batch_size={BATCH}",
        "data.num_workers=0",
        "tracking.wandb=false",
        "tracking.plots=false",
        "train.progress=false",
        *extra,
    ]


# Every process (DataLoader workers included) logs the files it opens under the data folder:
# an audit hook ("open" is raised by both io.open and os.open; an os.open inside an io.open
# of the same path, through an opener, is the same open).
OPEN_AUDIT = """
import os, sys, threading
_root = os.environ.get("OPEN_AUDIT_ROOT")
if _root:
    _last = threading.local()
    _log = open(os.path.join(os.environ["OPEN_AUDIT_LOG"], f"{os.getpid()}.txt"), "a", buffering=1)

    def _hook(event, args):
        if event != "open" or not isinstance(args[0], (str, os.PathLike)):
            return
        path = os.path.abspath(args[0])
        through_io = args[1] is not None
        if not through_io and getattr(_last, "path", None) == path:
            _last.path = None
            return
        _last.path = path if through_io else None
        if path.startswith(_root):
            _log.write(path + "\\n")
    sys.addaudithook(_hook)
"""


def counting_env(tmp, data, name):
    hook, log = tmp / "hook", tmp / f"opens-{name}"
    hook.mkdir(exist_ok=True)
    log.mkdir()
    (hook / "sitecustomize.py").write_text(OPEN_AUDIT)
    path = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
    return cli_env(PYTHONPATH=path, OPEN_AUDIT_ROOT=str(data / "train"), OPEN_AUDIT_LOG=str(log)), log


def opens(log) -> collections.Counter:
    return collections.Counter(line for f in log.iterdir() for line in f.read_text().splitlines())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder_training")
    data = make_folder(root / "data", CLASSES, N_TRAIN, N_VAL)
    # Dropout off so that every placement computes the same function (§5.1); the
    # paper config's towers=2 throughout, so `single` is the reference for all.
    same = [f"train.epochs={EPOCHS}", "train.log_every=1", "model.dropout=0", "train.mixed_precision=no"]
    workers = ["data.num_workers=1"]  # DataLoader workers too
    plan = {"single": SPLIT_MODES["single"]}
    for name, mode in PLACEMENTS.items():
        if name not in RESUMED_ONLY:
            plan[name] = (2, [*SPLIT_MODES[mode][1], *workers])
    out = {"data": data}
    for name, (nprocs, extra) in plan.items():
        out[name] = root / name
        env, out[f"opens:{name}"] = counting_env(root, data, name)
        run_cli(*args_for(data, out[name], CLASSES, *same, *extra), nprocs=nprocs, env=env)
    # Stopped after 4 of an epoch's 6 steps, then resumed to the end (no DataLoader workers:
    # none prefetches a batch past the stop, so every file open is accounted for).
    for name, mode in ((n, PLACEMENTS[n]) for n in RESUMED):
        out[f"{name}_resumed"] = root / f"{name}_resumed"
        env, out[f"opens:{name}_resumed"] = counting_env(root, data, f"{name}_resumed")
        extra = ["pipeline.microbatches=2"] if mode == "pipeline" else []
        for then in (f"train.max_steps={STOP}", "train.resume=auto"):
            args = args_for(data, out[f"{name}_resumed"], CLASSES, *same, *SPLIT_MODES[mode][1], *extra, then)
            run_cli(*args, nprocs=2, env=env)
        if name in RESUMED_ONLY:
            out[name], out[f"opens:{name}"] = out[f"{name}_resumed"], out[f"opens:{name}_resumed"]
    return out


@pytest.mark.parametrize(
    ("name", "world", "replicas"),
    [("single", 1, 1), ("ddp", 2, 2), ("mp", 2, 1), ("hybrid", 2, 2), ("pipe", 2, 1), ("fsdp", 2, 2)],
)
def test_training_completes_with_ten_crop_top1_top5(runs, name, world, replicas):
    s = summary(runs[name])
    assert (s["world_size"], s["replicas"], s["towers"]) == (world, replicas, 2)
    assert s["split_mode"] == {"single": "single", **PLACEMENTS}[name]
    assert s["steps"] == STEPS and s["epochs"] == EPOCHS
    assert 0.0 <= s["test_acc"] <= s["test_top5"] <= 1.0
    assert np.isfinite(s["loss"]) and s["examples_per_sec"] > 0
    epochs = [r for r in metrics(runs[name]) if "train_acc" in r]
    # A run stopped at max_steps=4 reports its part of epoch 1 when it ends; resumed, the rest.
    stopped = [STOP / (STEPS / EPOCHS)] if name in RESUMED_ONLY else []
    assert [r["epoch"] for r in epochs] == [*stopped, 1.0, 2.0]
    for row in epochs:
        assert {"test_acc", "test_top5", "lr"} <= row.keys()
        # every val image counted once: accuracies are multiples of 1/n
        n = CLASSES * N_VAL
        for key in ("test_acc", "test_top5"):
            assert abs(row[key] * n - round(row[key] * n)) < 1e-9, (key, row[key])


@pytest.mark.parametrize(
    "name", [*(p for p in PLACEMENTS if p not in RESUMED_ONLY), *(f"{p}_resumed" for p in RESUMED)]
)
def test_placements_follow_single_step_for_step(runs, name):
    ref, other = step_losses(runs["single"]), step_losses(runs[name])
    assert sorted(ref) == sorted(other) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(ref[step] - other[step]) <= 1e-4 * abs(ref[step]), (name, step, ref[step], other[step])
    # the same weights evaluated on the same crops: at most a borderline example may flip
    n = CLASSES * N_VAL
    for key in ("test_acc", "test_top5"):
        assert abs(summary(runs["single"])[key] - summary(runs[name])[key]) <= 1 / n + 1e-9, key


@pytest.mark.parametrize("name", ["single", *PLACEMENTS, "mp_resumed"])
def test_a_replica_opens_each_training_file_once_per_epoch(runs, name):
    """Once at the start-up check (the processes split the files), then once per epoch in the
    whole run: model-parallel's and hybrid's towers each decode a share and gather, a
    pipeline's later stage opens none, ddp's and fsdp's replicas each open their own rows."""
    train = sorted(str(p) for p in (runs["data"] / "train").rglob("*.*"))
    counted = opens(runs[f"opens:{name}"])
    assert sorted(counted) == train
    checks = 2 if name in RESUMED_ONLY or name.endswith("_resumed") else 1  # checked at each start
    assert set(counted.values()) == {checks + EPOCHS}, collections.Counter(counted.values())


def test_fewer_than_five_classes_reports_no_top5(tmp_path):
    """Centre-crop evaluation path; top-5 of 3 classes would be meaningless."""
    data = make_folder(tmp_path / "data", 3, 6, 2)
    out = tmp_path / "run"
    run_cli(*args_for(data, out, 3, "train.max_steps=1", "eval.ten_crop=false", "train.log_every=1"))
    s = summary(out)
    assert 0.0 <= s["test_acc"] <= 1.0 and "test_top5" not in s
    assert all("test_top5" not in r for r in metrics(out))


def test_the_bytes_sharing_the_decoded_batch_sends_are_counted(runs):
    """Each tower sends its half of every batch (uint8 crops, lighting shifts, labels) once:
    the gather's own count equals the formula, in every logged row; no other placement shares."""
    expected = input_bytes_per_step(BATCH, IMAGE, 2)
    assert expected == (BATCH // 2) * (3 * IMAGE * IMAGE + 20)
    rows = [r for r in metrics(runs["mp"]) if "train_acc" not in r]
    assert rows and all(r["input_bytes_per_step"] == expected for r in rows)
    assert summary(runs["mp"])["input_bytes_per_step"] == expected
    for name in ("single", "ddp", "hybrid", "pipe", "fsdp"):
        assert "input_bytes_per_step" not in summary(runs[name]), name
