"""End to end: a checkpoint of the paper's network (two towers, LRN) trained on a generated
ImageFolder, in use: class names are the folder names; evaluate (ten crops) and predict equal
a preprocessing written here from PIL and numpy (resize the shorter side, ten crops or the
centre crop, subtract the mean, average the softmax); the ONNX and plain state-dict exports
of the tower network reproduce it.  One tiny run for the module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import distalex
from distalex.model.alexnet import AlexNetSpec

from helpers import (
    EVALUATE,
    EXPORT,
    PAPER,
    PREDICT,
    assert_close,
    assert_plain_pytorch_loads,
    make_folder,
    png_size,
    run_cli,
    summary,
)

CLASSES = ["cat", "dog", "fish", "owl", "yak"]
IMAGE = AlexNetSpec(conv1_padding=2).smallest_image_size()
RESIZE = 72
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("use_imagefolder")
    data = make_folder(root / "data", CLASSES, n_train=4, n_val=3)
    out = root / "run"
    run_cli(
        "--config", PAPER, f"data.root={data}", f"train.output_dir={out}", "model.width=0.0625",
        f"data.image_size={IMAGE}", f"data.resize_size={RESIZE}", f"model.num_classes={len(CLASSES)}",
        "train.batch_size=10", "train.epochs=1", "data.num_workers=0", "train.mixed_precision=no",
        "tracking.wandb=false", "tracking.plots=false", "train.progress=false",
        "model.init=xavier",  # the paper's N(0, 0.01) leaves a 2-step tiny network nearly blind to its input
    )  # fmt: skip
    return data, out, sorted((out / "checkpoints").glob("step_*"))[-1]


def crops_by_hand(path: Path, ten: bool) -> np.ndarray:
    """[n_crops, 3, S, S]: shorter side to RESIZE (PIL bilinear, the longer side truncated as
    torchvision does), the ten crops (corners, centre, then their mirrors) or the centre one, minus the mean."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    short, long = min(w, h), max(w, h)
    size = (RESIZE, int(RESIZE * long / short)) if w == short else (int(RESIZE * long / short), RESIZE)
    a = np.asarray(im.resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
    a = (a - MEAN).transpose(2, 0, 1)
    H, W, s = a.shape[1], a.shape[2], IMAGE
    top, left = round((H - s) / 2), round((W - s) / 2)
    centre = a[:, top : top + s, left : left + s]
    if not ten:
        return centre[None]
    five = [a[:, :s, :s], a[:, :s, W - s :], a[:, H - s :, :s], a[:, H - s :, W - s :], centre]
    return np.stack(five + [c[:, :, ::-1] for c in five])


def probabilities_by_hand(model, path: Path, ten: bool) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.from_numpy(crops_by_hand(path, ten).copy())).double()
    return torch.softmax(logits, dim=1).mean(0).numpy()


def val_images(data: Path):
    return [(p, CLASSES.index(p.parent.name)) for p in sorted((data / "val").rglob("img*"))]


def test_ten_crop_evaluation_equals_the_hand_written_pipeline(trained, tmp_path):
    data, run, ckpt = trained
    proc = run_cli(str(ckpt), "--output-dir", str(tmp_path), script=EVALUATE)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["ten_crop"] and "(ten crops)" in proc.stdout
    assert result["classes"] == CLASSES and [r["class"] for r in result["per_class"]] == CLASSES
    assert result["top1"] == summary(run)["test_acc"]
    model = distalex.load_reference(str(ckpt)).eval()
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    for path, label in val_images(data):
        confusion[label, probabilities_by_hand(model, path, ten=True).argmax()] += 1
    np.testing.assert_array_equal(np.array(result["confusion"]), confusion)
    assert png_size(tmp_path / "confusion.png")[1] > 200


@pytest.mark.parametrize("ten", [False, True])
def test_predict_preprocesses_as_evaluation_does(trained, tmp_path, ten):
    data, _, ckpt = trained
    grid = tmp_path / "grid.png"
    proc = run_cli(str(ckpt), str(data / "val"), "--top-k", "5", "--grid", str(grid), *(["--ten-crop"] * ten),
                   script=PREDICT)  # fmt: skip
    rows = {r["image"]: r for r in map(json.loads, proc.stdout.splitlines())}
    model = distalex.load_reference(str(ckpt)).eval()
    images = val_images(data)
    assert len(rows) == len(images)
    for path, label in images:
        row = rows[str(path)]
        assert row["true"] == CLASSES[label]
        expected = probabilities_by_hand(model, path, ten)
        got = {t["class"]: t["probability"] for t in row["top"]}
        assert got == pytest.approx({c: float(p) for c, p in zip(CLASSES, expected, strict=True)}, abs=1e-5)
    assert png_size(grid)[1] > 200


def test_exports_of_the_tower_network_reproduce_it(trained, tmp_path):
    import onnxruntime

    data, _, ckpt = trained
    x = torch.from_numpy(np.concatenate([crops_by_hand(p, ten=True) for p, _ in val_images(data)[:2]]).copy())
    # Large inputs too: they drive the LRN layers far from their constant regime (k dominates small maps).
    batches = [x, x[:1].clone(), torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(0)) * 100]
    model = distalex.load_reference(str(ckpt)).eval()
    with torch.no_grad():
        expected = [model(b) for b in batches]
    run_cli(str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), script=EXPORT)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert_close([session.run(["logits"], {"images": b.numpy()})[0] for b in batches], expected)
    from distalex.cli import export_main

    assert export_main([str(ckpt), "--format", "state-dict", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert_plain_pytorch_loads(tmp_path / "m.safetensors", batches, expected, tmp_path)
