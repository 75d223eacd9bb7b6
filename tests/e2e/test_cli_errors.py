"""Guarantee 7: bad input -> one clear line naming the problem, exit 2, nothing overwritten."""

import gzip
import shutil
import time

import numpy as np
import pytest

from distalex.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES

from helpers import PAPER, QUICK, assert_bad_input, latest_checkpoint, make_folder, run_cli, summary


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("train.bach_size=4", ["train.bach_size", "unknown"]),
        ("train.batch_size=four", ["train.batch_size"]),
        ("train.batch_size=0", ["train.batch_size", ">= 1"]),
        ("optim.lr=0", ["optim.lr", "> 0"]),
        ("train.epochs=-1", ["train.epochs"]),
        ("data.image_size=40", ["data.image_size=40", "smallest image size that works is 65"]),
        ("model.towers=5", ["model.towers=5"]),
        ("train.mixed_precision=fp16", ["fp16", "CUDA"]),
        ("model.width=inf", ["model.width", "finite", "inf"]),
        ("optim.lr=inf", ["optim.lr", "finite"]),
        ("optim.lr=nan", ["optim.lr", "finite"]),
        ("optim.momentum=1", ["optim.momentum", "[0, 1)"]),
        ("train.epochs=100000000000000000000", ["train.epochs", "64-bit"]),
        ("train.batch_size=[1,", ["train.batch_size=[1,", "cannot be parsed"]),
        ("train.output_dir=${oc.env:DISTALEX_SURELY_UNSET_VAR}", ["DISTALEX_SURELY_UNSET_VAR"]),
    ],
)
def test_bad_config_values(tmp_path, override, needles):
    assert_bad_input(run_cli(*QUICK, f"train.output_dir={tmp_path}/run", override, check=False), *needles)
    assert not (tmp_path / "run").exists()


def test_missing_config_file_and_bad_split_mode(tmp_path):
    assert_bad_input(run_cli("--config", str(tmp_path / "nope.yaml"), check=False), "nope.yaml", "does not exist")
    proc = run_cli("--split-mode", "tensor-parallel", check=False)  # not a split mode distalex has
    assert proc.returncode == 2 and "tensor-parallel" in proc.stderr


def test_batch_not_divisible_by_replicas(tmp_path):
    proc = run_cli(
        *QUICK, "--split-mode", "ddp", "train.batch_size=33", f"train.output_dir={tmp_path}", nprocs=2, check=False
    )
    assert proc.returncode != 0
    assert "global batch 33 is not divisible by 2 replicas" in proc.stderr
    assert proc.stderr.count("distalex: error:") == 1


def test_missing_and_corrupt_data(tmp_path):
    assert_bad_input(
        run_cli(*QUICK, f"data.root={tmp_path}/empty", f"train.output_dir={tmp_path}/a", check=False),
        "Fashion-MNIST not found",
        "apt-get install dataset-fashion-mnist",
    )
    data = tmp_path / "fm"
    data.mkdir()
    for stem in FASHION_MNIST_FILES:
        shutil.copy(f"{DEBIAN_FASHION_MNIST}/{stem}.gz", data)
    with gzip.open(data / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + b"\x00" * 100)
    assert_bad_input(
        run_cli(*QUICK, f"data.root={data}", f"train.output_dir={tmp_path}/b", check=False),
        "t10k-labels-idx1-ubyte.gz is corrupt",
    )


def test_existing_run_is_not_overwritten_and_foreign_checkpoint_refused(tmp_path):
    out = tmp_path / "run"
    run_cli(*QUICK, "train.max_steps=3", f"train.output_dir={out}")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert_bad_input(
        run_cli(*QUICK, "train.max_steps=3", f"train.output_dir={out}", check=False),
        str(out),
        "already holds a run",
        "train.resume=auto",
        "train.overwrite=true",
    )
    # A checkpoint of another architecture (towers, width) is refused before anything is written.
    ckpt = latest_checkpoint(out)
    assert_bad_input(
        run_cli(*QUICK, "model.towers=2", f"train.resume={ckpt}", f"train.output_dir={tmp_path}/other", check=False),
        "different network",
        "towers",
    )
    assert_bad_input(
        run_cli(*QUICK, "model.width=0.25", f"train.resume={ckpt}", f"train.output_dir={out}", check=False),
        "different network",
        "width",
    )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    assert_bad_input(
        run_cli(*QUICK, f"train.resume={corrupt}", f"train.output_dir={tmp_path}/c", check=False),
        "corrupt.safetensors",
        "cannot be read",
    )
    assert_bad_input(
        run_cli(*QUICK, f"train.resume={tmp_path}/missing.pt", f"train.output_dir={tmp_path}/d", check=False),
        "missing.pt",
        "does not exist",
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts
    # overwrite=true replaces it.
    run_cli(*QUICK, "train.max_steps=2", "train.overwrite=true", f"train.output_dir={out}")
    assert summary(out)["steps"] == 2


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"train:\n  batch_size: [1,\n", ["line 3"]),
        (b"- model\n- train\n", ["line 1", "top level must be a mapping"]),
        (b"train:\n  epochs: 1\n  epochs: 2\n", ["line 3", "duplicate key epochs"]),
        (b"experiment: caf\xe9\n", ["line 1", "not UTF-8"]),
        (b"train: !!python/object/apply:os.system [echo pwned]\n", ["line 1", "python/object/apply:os.system"]),
    ],
)
def test_unusable_config_file(tmp_path, content, needles):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    proc = run_cli("--config", str(path), f"train.output_dir={tmp_path}/run", check=False)
    assert_bad_input(proc, str(path), *needles)
    assert not (tmp_path / "run").exists()
    assert "pwned" not in proc.stdout


def test_config_path_is_a_directory(tmp_path):
    assert_bad_input(run_cli("--config", str(tmp_path), check=False), str(tmp_path), "is a directory")


# --------------------------------------------------------------------------- ImageFolder data


def imagefolder_args(root, out, *extra):
    """A seconds-long ImageFolder run of the paper recipe (tiny width, small crops)."""
    return [
        "--config", PAPER, f"data.root={root}", f"train.output_dir={out}", "model.width=0.125",
        "data.image_size=67", "data.resize_size=72", "model.conv1_padding=1", "model.num_classes=3",
        "train.batch_size=6", "data.num_workers=0", "tracking.wandb=false", "tracking.plots=false",
        "train.progress=false", *extra,
    ]  # fmt: skip


def test_gpu_decoding_without_a_gpu_is_refused_before_anything_is_written(tmp_path):
    root = make_folder(tmp_path / "data", 3, n_train=4, n_val=2)
    out = tmp_path / "run"
    proc = run_cli(*imagefolder_args(root, out, "data.decode=gpu"), check=False)
    assert_bad_input(proc, "data.decode", "CUDA", "data.decode=cpu or auto")
    assert not out.exists()


@pytest.mark.parametrize("nprocs", [1, 2])
def test_unreadable_image_is_refused_before_anything_is_written(tmp_path, nprocs):
    root = make_folder(tmp_path / "data", 3, n_train=4, n_val=2)
    bad = root / "val" / "class1" / "img1.png"  # index 3 of the samples: the second process's share
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated before its header")
    out = tmp_path / "run"
    split = ["--split-mode", "ddp"] if nprocs == 2 else []
    started = time.time()
    proc = run_cli(*imagefolder_args(root, out, *split), nprocs=nprocs, check=False)
    if nprocs == 1:
        assert_bad_input(proc, str(bad), "cannot be read")
    else:  # the launcher reports its own status; every process refused with the same one line
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
        assert len(errors) == 1 and str(bad) in errors[0], proc.stderr[-3000:]
        assert time.time() - started < 120, "a process was left waiting for the one that refused"
    assert not out.exists()


def test_image_damaged_past_its_header_fails_the_run_and_keeps_checkpoints(tmp_path):
    import io

    from PIL import Image

    from distalex.training.checkpoint import list_checkpoints, read

    root = make_folder(tmp_path / "data", 3, n_train=4, n_val=2)
    bad = root / "val" / "class2" / "img0.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])  # the header passes, decoding fails
    out = tmp_path / "run"
    proc = run_cli(*imagefolder_args(root, out, "train.checkpoint_every=1", "train.epochs=1"), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distalex: error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "during the run" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    ckpts = list_checkpoints(str(out))
    assert ckpts and read(ckpts[-1])["position"]["step"] == 2  # 12 images / 6 per step, then evaluation
    assert not (out / "summary.json").exists()


def test_data_warnings_are_one_line_each_on_the_main_process(tmp_path):
    root = make_folder(tmp_path / "data", 3, n_train=2, n_val=1)
    for split in ("train", "val"):
        (root / split / "class3").mkdir()  # an empty class
    (root / "train" / "class0" / "loop").symlink_to("..")
    proc = run_cli(
        *imagefolder_args(root, tmp_path / "run", "model.num_classes=4", "train.max_steps=1", "--split-mode", "ddp"),
        nprocs=2,
    )
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("distalex: warning:")]
    assert len(warnings) == 3, proc.stderr[-3000:]  # empty class in train/ and val/, the link; once each
    assert sum("class3" in w for w in warnings) == 2 and sum("loop" in w for w in warnings) == 1
