"""End to end: a trained checkpoint in use through the real command lines -- evaluate (1 and 2
processes), predict, export (ONNX run by onnxruntime, torch.export, a plain state dict loaded
without distalex) -- on one tiny synthetic run trained once for the module."""

from __future__ import annotations

import fcntl
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import distalex
from distalex.data import make_synthetic
from distalex.data.common import GlobalBatchPlan
from distalex.data.memory import DeviceLoader

from helpers import (
    EVALUATE,
    EXPORT,
    PREDICT,
    QUICK,
    ROOT,
    assert_bad_input,
    assert_close,
    assert_plain_pytorch_loads,
    latest_checkpoint,
    png_size,
    run_cli,
    summary,
)

TEST_SIZE, SEED, SIDE = 96, 0, 67
RUN = [
    *QUICK, "data.name=synthetic", "model.width=0.0625", "data.synthetic_train_size=256",
    f"data.synthetic_test_size={TEST_SIZE}", "train.epochs=1", "train.mixed_precision=no", f"train.seed={SEED}",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_cli(*RUN, f"train.output_dir={out}")
    return out


@pytest.fixture(scope="module")
def ckpt(run):
    return latest_checkpoint(run)


def synthetic_test_set():
    """The synthetic test set the run evaluated on (data/__init__.py draws it with seed + 2)."""
    return make_synthetic(TEST_SIZE, 10, 1, 28, seed=SEED + 2)


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of a checkpoint whose JSON was changed by ``change(info)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        info = json.loads(fh.metadata()["distalex"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    change(info)
    save_file(tensors, str(dst), metadata={"distalex": json.dumps(info)})
    return dst


def evaluate(ckpt, out, *extra, nprocs=1, check=True):
    return run_cli(str(ckpt), "--output-dir", str(out), *extra, script=EVALUATE, nprocs=nprocs, check=check)


# --------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("nprocs", [1, 2])
def test_evaluation_reproduces_the_run_figures(run, ckpt, tmp_path, nprocs):
    proc = evaluate(ckpt, tmp_path / "eval", nprocs=nprocs)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    s = summary(run)
    assert result["top1"] == s["test_acc"] and result["top5"] == s["test_top5"], (result, s)
    assert result["world_size"] == nprocs and result["examples"] == TEST_SIZE
    confusion = np.array(result["confusion"])
    truth = synthetic_test_set().labels.numpy()
    np.testing.assert_array_equal(confusion.sum(1), np.bincount(truth, minlength=10))  # rows: true classes
    assert np.trace(confusion) / TEST_SIZE == result["top1"]
    assert result["classes"] == [f"class{i}" for i in range(10)]
    for i, row in enumerate(result["per_class"]):
        assert row["class"] == f"class{i}" and row["examples"] == confusion[i].sum()
        assert row["accuracy"] == pytest.approx(confusion[i, i] / confusion[i].sum())
    assert png_size(tmp_path / "eval" / "confusion.png")[1] > 200
    assert f"top-1 {result['top1']:.4f}" in proc.stdout


def test_evaluation_never_reads_the_figures_a_checkpoint_carries(run, ckpt, tmp_path):
    def lie(info):
        info["last_eval"].update(test_acc=0.987, test_top5=0.999)

    forged = rewrite(ckpt, tmp_path / ckpt.name, lie)
    evaluate(forged, tmp_path / "eval")
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["top1"] == summary(run)["test_acc"] != 0.987
    assert result["top5"] == summary(run)["test_top5"] != 0.999


def test_the_output_dir_is_never_overwritten_without_overwrite(ckpt, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text('{"top1": "an earlier evaluation"}')
    assert_bad_input(evaluate(ckpt, out, check=False), "already holds eval.json", "--overwrite")
    assert "earlier" in (out / "eval.json").read_text() and not (out / "confusion.png").exists()
    with open(out / ".lock", "w") as held:  # another evaluation is running into it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert_bad_input(evaluate(ckpt, out, "--overwrite", check=False), "in use by another run")
    assert "earlier" in (out / "eval.json").read_text()
    evaluate(ckpt, out, "--overwrite")
    assert json.loads((out / "eval.json").read_text())["examples"] == TEST_SIZE


def test_a_config_that_does_not_describe_the_checkpoint_is_refused(ckpt, tmp_path):
    from distalex.cli import evaluate_main, export_main, predict_main

    out = tmp_path / "eval"
    for main, args in (
        (evaluate_main, [str(ckpt), "--output-dir", str(out), "model.width=0.125"]),
        (export_main, [str(ckpt), "--format", "pt2", "--out", str(tmp_path / "m.pt2"), "data.image_size=99"]),
    ):
        assert main(args) == 2
    assert predict_main([str(ckpt), str(tmp_path), "--config", str(ROOT / "configs" / "tiny.yaml")]) == 2
    assert not out.exists() and not (tmp_path / "m.pt2").exists()


# --------------------------------------------------------------------------- predict
def save_test_images(root: Path, n: int = 12) -> tuple[Path, list]:
    """The first ``n`` test images as PNGs in a labelled folder (<root>/class<k>/<i>.png)."""
    data = synthetic_test_set()
    paths = []
    for i in range(n):
        d = root / f"class{int(data.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        paths.append(d / f"{i:03d}.png")
        Image.fromarray(data.images[i, 0].numpy(), mode="L").save(paths[-1])
    return root, paths


def lines(proc) -> dict:
    return {Path(r["image"]).name: r for r in map(json.loads, proc.stdout.splitlines())}


def test_predictions_are_the_evaluation_softmax_of_the_same_images(ckpt, tmp_path, capsys):
    folder, paths = save_test_images(tmp_path / "val")
    proc = run_cli(str(ckpt), str(folder), "--top-k", "3", "--grid", str(tmp_path / "grid.png"), script=PREDICT)
    got = lines(proc)
    assert len(got) == len(paths)
    # The reference: the evaluation loader's own batch of the same examples, the model's softmax.
    plan = GlobalBatchPlan(len(paths), len(paths))
    data = synthetic_test_set().limit(len(paths))
    x, y = next(DeviceLoader(data, plan, SIDE, torch.device("cpu")).eval_batches(len(paths)))
    with torch.no_grad():
        probs = torch.softmax(distalex.load_reference(str(ckpt)).eval()(x), dim=1)
    for i, path in enumerate(paths):
        row = got[path.name]
        assert row["true"] == f"class{int(y[i])}"
        assert [t["index"] for t in row["top"]] == probs[i].topk(3).indices.tolist()
        assert [t["class"] for t in row["top"]] == [f"class{t['index']}" for t in row["top"]]
        np.testing.assert_allclose([t["probability"] for t in row["top"]], probs[i].topk(3).values, atol=1e-6)
    assert png_size(tmp_path / "grid.png")[1] > 300
    from distalex.cli import predict_main

    grid = (tmp_path / "grid.png").read_bytes()
    assert predict_main([str(ckpt), str(paths[0]), "--grid", str(tmp_path / "grid.png")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "grid.png").read_bytes() == grid


def odd_images(d: Path, base: np.ndarray) -> dict:
    """Valid images the network cannot take as they are, and the 8-bit grayscale image each one
    shows (what a correct conversion gives)."""
    d.mkdir()
    rgb = np.stack([base] * 3, axis=-1)
    other = 255 - base
    made = {
        "rgb.png": (Image.fromarray(rgb, "RGB"), base),
        "sixteen.png": (Image.fromarray(base.astype(np.uint16) * 257), base),  # 16-bit, full range
        "cmyk.jpg": (Image.fromarray(rgb, "RGB").convert("CMYK"), None),
        "palette.png": (Image.fromarray(base, "L").convert("P"), base),
        "alpha.png": (Image.fromarray(np.dstack([rgb, np.full_like(base, 128)]), "RGBA"), base),
    }
    for name, (im, _) in made.items():
        im.save(d / name, quality=95) if name.endswith(".jpg") else im.save(d / name)
    frames = [Image.fromarray(base, "L"), Image.fromarray(other, "L")]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    Image.fromarray(base, "L").save(d / "plain.png")
    return {name: shows for name, (_, shows) in made.items()} | {"animated.gif": base, "plain.png": base}


def test_odd_but_valid_images_are_converted_with_a_notice(ckpt, tmp_path):
    base = synthetic_test_set().images[0, 0].numpy()
    shows = odd_images(tmp_path / "odd", base)
    proc = run_cli(str(ckpt), str(tmp_path / "odd"), "--top-k", "10", script=PREDICT)
    got = lines(proc)
    assert set(got) == set(shows)
    notices = {
        "rgb.png": "RGB converted to grayscale",
        "sixteen.png": "16-bit",
        "cmyk.jpg": "CMYK converted to RGB",
        "palette.png": "palette",
        "alpha.png": "alpha channel dropped",
        "animated.gif": "first frame",
    }
    for name, words in notices.items():
        assert re.search(rf"distalex: notice: .*{re.escape(name)}: .*{words}", proc.stderr), (name, proc.stderr)
    assert "plain.png:" not in proc.stderr

    def probs(row):
        return dict(sorted((t["index"], t["probability"]) for t in row["top"]))

    for name, image in shows.items():
        if image is not None:  # the conversion gave exactly the 8-bit grayscale image
            assert probs(got[name]) == pytest.approx(probs(got["plain.png"]), abs=1e-6), name


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid PNG header claiming side x side pixels (beyond PIL's decompression-bomb limit)."""

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\0" * (side + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_unreadable_images_are_refused_before_anything_is_printed(ckpt, tmp_path, capsys):
    from distalex.cli import predict_main
    from distalex.serving.predict import BATCH

    good = tmp_path / "good.png"
    Image.fromarray(synthetic_test_set().images[0, 0].numpy(), "L").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-40])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    for bad, why in (
        (truncated, "truncated"),
        (empty, "cannot identify"),
        (text, "cannot identify"),
        (bomb_png(tmp_path / "bomb.png"), "decompression bomb"),  # beyond 2x PIL's limit: PIL refuses it
        (bomb_png(tmp_path / "bomb2.png", side=10000), "decompression bomb"),  # 1-2x: PIL only warns
        (tmp_path / "missing.png", "does not exist"),
    ):
        grid = tmp_path / "grid.png"
        # More good images than one forward pass takes: the bad one comes after a batch is ready.
        assert predict_main([str(ckpt), *[str(good)] * (BATCH + 1), str(bad), "--grid", str(grid)]) == 2, bad
        out, err = capsys.readouterr()
        assert out == "" and not grid.exists(), bad
        errors = [line for line in err.splitlines() if line.startswith("distalex: error:")]
        assert len(errors) == 1 and str(bad) in errors[0] and why in errors[0].lower(), (bad, err)


def test_a_checkpoint_without_class_names_falls_back_to_indices(ckpt, tmp_path, capsys):
    from distalex.cli import predict_main

    old = rewrite(ckpt, tmp_path / ckpt.name, lambda info: info.pop("classes"))
    Image.fromarray(synthetic_test_set().images[0, 0].numpy(), "L").save(tmp_path / "a.png")
    assert predict_main([str(old), str(tmp_path / "a.png")]) == 0
    out, err = capsys.readouterr()
    row = json.loads(out)
    assert [t["class"] for t in row["top"]] == [str(t["index"]) for t in row["top"]]
    assert "carries no class names" in err


# --------------------------------------------------------------------------- export
def reference_outputs(ckpt, batches):
    model = distalex.load_reference(str(ckpt)).eval()
    with torch.no_grad():
        return [model(x) for x in batches]


def check_batches():
    """Inputs the export was not traced or verified with: another batch size, real test images."""
    g = torch.Generator().manual_seed(123)
    data = synthetic_test_set()
    x, _ = next(DeviceLoader(data, GlobalBatchPlan(TEST_SIZE, 32), SIDE, torch.device("cpu")).eval_batches(7))
    return [torch.rand(5, 1, SIDE, SIDE, generator=g), x.contiguous()]


def test_onnx_export_runs_in_onnxruntime_like_the_reference_model(ckpt, tmp_path):
    import onnxruntime

    out = tmp_path / "alexnet.onnx"
    proc = run_cli(str(ckpt), "--format", "onnx", "--out", str(out), script=EXPORT)
    assert "verified against the reference model" in proc.stdout and "evaluation images" in proc.stdout
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batches = check_batches()
    got = [torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0]) for x in batches]
    assert_close(got, reference_outputs(ckpt, batches))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_pt2_and_state_dict_exports_reproduce_the_model(ckpt, tmp_path, capsys):
    from distalex.cli import export_main

    batches = check_batches()
    expected = reference_outputs(ckpt, batches)
    assert export_main([str(ckpt), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    with torch.no_grad():
        assert_close([program(x) for x in batches], expected)
    assert export_main([str(ckpt), "--format", "state-dict", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "max |difference|" in capsys.readouterr().out
    assert_plain_pytorch_loads(tmp_path / "m.safetensors", batches, expected, tmp_path)


def test_export_refuses_an_existing_file_and_an_unknown_format(ckpt, tmp_path, capsys):
    from distalex.cli import export_main

    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    assert export_main([str(ckpt), "--format", "onnx", "--out", str(out)]) == 2
    assert out.read_bytes() == b"keep me"
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert export_main([str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.tflite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown format 'tflite'" in err
    assert not (tmp_path / "m.tflite").exists()


def test_export_never_writes_through_a_link_or_into_a_special_file(ckpt, tmp_path, capsys):
    """--out as a link (even with --overwrite) or a FIFO is refused before anything runs;
    the temporary file lives in a fresh private folder, so a link planted under the old
    predictable name (``.<stem>.<pid>.tmp<suffix>``) is never followed."""
    import os

    from distalex.cli import export_main

    victim = tmp_path / "users_file"
    victim.write_bytes(b"keep me")
    link = tmp_path / "m.pt2"
    link.symlink_to(victim)
    assert export_main([str(ckpt), "--format", "pt2", "--out", str(link), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symbolic link" in err
    assert victim.read_bytes() == b"keep me" and link.is_symlink()
    fifo = tmp_path / "f.pt2"
    os.mkfifo(fifo)
    assert export_main([str(ckpt), "--format", "pt2", "--out", str(fifo), "--overwrite"]) == 2
    assert "is a FIFO" in capsys.readouterr().err
    planted = tmp_path / f".ok.{os.getpid()}.tmp.pt2"
    planted.symlink_to(victim)
    assert export_main([str(ckpt), "--format", "pt2", "--out", str(tmp_path / "ok.pt2")]) == 0
    assert victim.read_bytes() == b"keep me" and (tmp_path / "ok.pt2").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [planted.name]


def test_an_export_that_does_not_reproduce_the_model_is_not_kept(ckpt, tmp_path, monkeypatch):
    from distalex.errors import ExportFailure
    from distalex.serving import export
    from distalex.serving.loaded import open_checkpoint

    loaded = open_checkpoint(ckpt)
    real = export._run_state_dict

    def off_by_a_little(path, loaded):
        model = real(path, loaded)
        with torch.no_grad():
            model.fc8.bias.add_(1e-3)
        return model

    monkeypatch.setattr(export, "_run_state_dict", off_by_a_little)
    with pytest.raises(ExportFailure, match="differs from the reference model"):
        export.export(loaded, "state-dict", tmp_path / "m.safetensors", False, notify=print)
    assert list(tmp_path.iterdir()) == []
