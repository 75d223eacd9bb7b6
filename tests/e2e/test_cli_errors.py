"""Guarantee 7: bad input -> one clear line naming the problem, exit 2, nothing overwritten."""

import gzip
import shutil

import pytest

from distalex.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES

from helpers import QUICK, assert_bad_input, latest_checkpoint, run_cli, summary


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
    ],
)
def test_bad_config_values(tmp_path, override, needles):
    assert_bad_input(run_cli(*QUICK, f"train.output_dir={tmp_path}/run", override, check=False), *needles)
    assert not (tmp_path / "run").exists()


def test_missing_config_file_and_bad_split_mode(tmp_path):
    assert_bad_input(run_cli("--config", str(tmp_path / "nope.yaml"), check=False), "nope.yaml", "does not exist")
    proc = run_cli("--split-mode", "pipeline", check=False)
    assert proc.returncode == 2 and "pipeline" in proc.stderr


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
