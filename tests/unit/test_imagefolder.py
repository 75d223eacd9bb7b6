"""ImageFolder pipeline: PCA lighting, ten crops, batch plan, resume, errors."""

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from distalex.config import load_config
from distalex.data import DataError, SharedCheck, build_data, epoch_permutation
from distalex.data.imagefolder import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    IMAGENET_MEAN,
    EvalTransform,
    PCALighting,
    build_imagefolder,
    limit_samples,
    sample_generator,
    scan_split,
    ten_crop,
    verify_images,
)
from distalex.errors import DataFailure, RunFailure

from helpers import make_folder

CLASSES = ("cat", "dog", "fox")
S, RESIZE = 32, 36


# --------------------------------------------------------------------------- PCA lighting


def draws(sigma: float, n: int, seed: int) -> torch.Tensor:
    lighting = PCALighting(sigma)
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(99))
    offsets = []
    for _ in range(n):
        delta = lighting(img, g) - img
        # one colour shift for the whole image
        torch.testing.assert_close(delta, delta[:, :1, :1].expand_as(delta))
        offsets.append(delta[:, 0, 0])
    return torch.stack(offsets)


def test_pca_lighting_statistics():
    n = 4000
    small, large = draws(0.1, n, seed=1), draws(0.2, n, seed=2)
    # expected per-channel std: sigma * || eigvec[c, :] * eigval ||
    vec, val = torch.tensor(IMAGENET_EIGVEC), torch.tensor(IMAGENET_EIGVAL)
    unit_std = (vec * val).norm(dim=1)
    for sigma, d in ((0.1, small), (0.2, large)):
        std = sigma * unit_std
        assert (d.mean(0).abs() < 4 * std / n**0.5).all()  # mean ~ 0
        torch.testing.assert_close(d.std(0), std, rtol=0.06, atol=0)
    ratio = large.std(0) / small.std(0)
    assert ((ratio > 1.85) & (ratio < 2.15)).all(), ratio


def test_pca_lighting_sigma_zero_is_identity():
    img = torch.rand(3, 6, 6)
    out = PCALighting(0.0)(img, torch.Generator().manual_seed(0))
    assert torch.equal(out, img)


# --------------------------------------------------------------------------- ten crop


def test_ten_crop_geometry_and_mirrors():
    img = torch.rand(3, 20, 24)
    crops = ten_crop(img, 8)
    assert crops.shape == (10, 3, 8, 8)
    torch.testing.assert_close(crops[0], img[:, :8, :8])  # top-left
    torch.testing.assert_close(crops[1], img[:, :8, -8:])  # top-right
    torch.testing.assert_close(crops[2], img[:, -8:, :8])  # bottom-left
    torch.testing.assert_close(crops[3], img[:, -8:, -8:])  # bottom-right
    torch.testing.assert_close(crops[4], TF.center_crop(img, [8, 8]))
    for k in range(5):
        torch.testing.assert_close(crops[k + 5], crops[k].flip(-1))
    assert not torch.equal(crops[0], crops[5])


def test_ten_crop_of_constant_image_equals_centre_crop():
    pil = Image.new("RGB", (40, 48), (200, 30, 90))
    ten = EvalTransform(RESIZE, S, ten_crop=True)(pil)
    one = EvalTransform(RESIZE, S, ten_crop=False)(pil)
    assert ten.shape == (10, 3, S, S) and one.shape == (3, S, S)
    for k in range(10):
        torch.testing.assert_close(ten[k], one)
    # mean subtraction on [0, 1] values
    expected = torch.tensor([200 / 255, 30 / 255, 90 / 255]) - torch.tensor(IMAGENET_MEAN)
    torch.testing.assert_close(one[:, 5, 5], expected, rtol=0, atol=1e-6)
    # the evaluation the training loop does: softmax averaged over the 10 crops
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    with torch.no_grad():
        one_scores = net(one[None]).softmax(1)
        ten_scores = net(ten).softmax(1).mean(0, keepdim=True)
    torch.testing.assert_close(ten_scores, one_scores)


# --------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imagefolder"), CLASSES)


def cfg_for(root, *extra):
    return load_config(
        None,
        [
            "data.name=imagefolder",
            f"data.root={root}",
            f"data.image_size={S}",
            f"data.resize_size={RESIZE}",
            "data.num_workers=0",
            "model.in_channels=3",
            f"model.num_classes={len(CLASSES)}",
            "model.width=0.125",
            "train.batch_size=4",
            "train.seed=3",
            *extra,
        ],
    )


def collect(iterator):
    return [(x.clone(), y.clone()) for x, y in iterator]


def test_train_batches_shape_dtype_and_plan(folder):
    cfg = cfg_for(folder)
    bundle = build_imagefolder(cfg, 0, 1, torch.device("cpu"))
    assert bundle.classes == CLASSES and bundle.num_classes == 3
    train = bundle.train
    assert train.batches_per_epoch == 18 // 4 == 4  # last partial batch dropped
    batches = collect(train.epoch(1))
    assert len(batches) == 4
    order = epoch_permutation(18, 3, 1)
    for b, (x, y) in enumerate(batches):
        assert x.shape == (4, 3, S, S) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.dtype == torch.int64
        want = [train.samples[i][1] for i in order[b * 4 : (b + 1) * 4].tolist()]
        assert y.tolist() == want
    # a different epoch: a different order and different augmentation
    other = collect(train.epoch(2))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other, strict=True))


def test_channels_last(folder):
    bundle = build_imagefolder(cfg_for(folder, "train.channels_last=true"), 0, 1, torch.device("cpu"))
    x, _ = next(iter(bundle.train.epoch(0)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_replica_slices_make_the_global_batch(folder):
    cfg = cfg_for(folder)
    cpu = torch.device("cpu")
    whole = collect(build_imagefolder(cfg, 0, 1, cpu).train.epoch(0))
    parts = [collect(build_imagefolder(cfg, r, 2, cpu).train.epoch(0)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for b, (x, y) in enumerate(whole):
        assert parts[0][b][0].shape == (2, 3, S, S)
        assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), y)
        assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), x)


def test_resume_and_workers_reproduce_the_same_tensors(folder):
    cpu = torch.device("cpu")
    full = collect(build_imagefolder(cfg_for(folder), 1, 2, cpu).train.epoch(5))
    loader = build_imagefolder(cfg_for(folder, "data.num_workers=2"), 1, 2, cpu).train
    resumed = collect(loader.epoch(5, start_batch=2))
    assert len(resumed) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(full[2:], resumed, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # the persistent workers serve the next epochs too, even after an abandoned one
    it = loader.epoch(6)
    next(it)
    it.close()
    again = collect(loader.epoch(5))
    for (xa, ya), (xb, yb) in zip(full, again, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("workers", [0, 1])
def test_loaders_leave_the_global_rng_alone(folder, workers):
    # dropout draws from the global RNG: the data pipeline must not, or a resumed
    # run (whose loaders start at a different point) would get other dropout masks
    bundle = build_imagefolder(cfg_for(folder, f"data.num_workers={workers}"), 0, 1, torch.device("cpu"))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    collect(bundle.train.epoch(0, start_batch=3))
    collect(bundle.train.epoch(1, start_batch=3))
    collect(bundle.test.eval_batches(9))
    assert torch.equal(torch.get_rng_state(), state)


def test_augmentation_depends_only_on_seed_epoch_index():
    a = torch.rand(5, generator=sample_generator(3, 1, 7))
    assert torch.equal(a, torch.rand(5, generator=sample_generator(3, 1, 7)))
    assert not torch.equal(a, torch.rand(5, generator=sample_generator(3, 2, 7)))
    assert not torch.equal(a, torch.rand(5, generator=sample_generator(3, 1, 8)))
    assert not torch.equal(a, torch.rand(5, generator=sample_generator(4, 1, 7)))


@pytest.mark.parametrize("ten", [False, True])
def test_eval_covers_every_example_once(folder, ten):
    cfg = cfg_for(folder, f"eval.ten_crop={str(ten).lower()}")
    cpu = torch.device("cpu")
    single = collect(build_imagefolder(cfg, 0, 1, cpu).test.eval_batches(4))
    shares = [collect(build_imagefolder(cfg, r, 2, cpu).test.eval_batches(4)) for r in range(2)]
    crop_shape = (10, 3, S, S) if ten else (3, S, S)
    x1 = torch.cat([x for x, _ in single])
    y1 = torch.cat([y for _, y in single])
    assert x1.shape == (9, *crop_shape) and y1.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    sizes = [sum(len(y) for _, y in share) for share in shares]
    assert sizes == [9 * 1 // 2, 9 - 9 * 1 // 2]  # [n*r//R, n*(r+1)//R)
    x2 = torch.cat([x for share in shares for x, _ in share])
    y2 = torch.cat([y for share in shares for _, y in share])
    assert torch.equal(y1, y2) and torch.equal(x1, x2)
    # evaluation is deterministic: a second pass gives the same tensors
    again = torch.cat([x for x, _ in build_imagefolder(cfg, 0, 1, cpu).test.eval_batches(3)])
    assert torch.equal(again, x1)


# --------------------------------------------------------------------------- errors


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        build_imagefolder(cfg_for(missing), 0, 1, torch.device("cpu"))


def test_missing_val_folder(tmp_path, folder):
    root = tmp_path / "copy"
    shutil.copytree(folder / "train", root / "train")
    with pytest.raises(DataError, match=str(root / "val")) as err:
        build_imagefolder(cfg_for(root), 0, 1, torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_no_images(tmp_path):
    for split in ("train", "val"):
        for name in CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=f"{tmp_path / 'train'}.*no images"):
        build_imagefolder(cfg_for(tmp_path), 0, 1, torch.device("cpu"))


def test_class_mismatch_and_num_classes(tmp_path):
    root = make_folder(tmp_path / "a", CLASSES, n_train=2, n_val=1)
    (root / "val" / "fox").rename(root / "val" / "wolf")
    with pytest.raises(DataError, match="differ.*fox.*wolf"):
        build_imagefolder(cfg_for(root), 0, 1, torch.device("cpu"))
    root = make_folder(tmp_path / "b", CLASSES, n_train=2, n_val=1)
    with pytest.raises(DataError, match="3 classes but model.num_classes=5"):
        build_data(cfg_for(root, "model.num_classes=5"), 0, 1, torch.device("cpu"))


# torch joins a DataLoader's workers with a 5 s timeout after one of them raised;
# keeping the failed loader alive until exit (where torch skips the join) saves that.
_FAILED_LOADERS = []

CPU = torch.device("cpu")


def _truncated_jpeg(path):
    """A JPEG whose header is intact and whose image data stops half way."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize(
    ("split", "content"),
    [
        ("train", b"not a jpeg"),
        ("train", b""),
        ("val", b"\x89PNG\r\n\x1a\n" + b"\x00" * 10),  # a PNG signature and nothing after it
        ("val", b"<html>a page saved under an image name</html>"),
    ],
)
def test_unreadable_image_is_refused_before_anything_runs(tmp_path, split, content):
    root = make_folder(tmp_path, CLASSES, n_train=2, n_val=1)
    bad = root / split / "dog" / "img0.jpg"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(bad))) as err:
        build_imagefolder(cfg_for(root), 0, 1, CPU)
    assert "\n" not in str(err.value)


def test_a_limited_run_checks_only_the_images_it_uses(tmp_path):
    root = make_folder(tmp_path, CLASSES, n_train=4, n_val=1)
    (root / "train" / "cat" / "img1.png").write_bytes(b"junk")  # not among the first-of-each evenly spaced 3
    used = limit_samples(scan_split(root / "train")[1], 3)
    assert str(root / "train" / "cat" / "img1.png") not in [p for p, _ in used]
    build_imagefolder(cfg_for(root, "data.train_limit=3", "train.batch_size=3"), 0, 1, CPU)


def test_processes_split_the_check_and_agree_on_the_first_bad_file(tmp_path, monkeypatch):
    import distalex.data.imagefolder as imf

    root = make_folder(tmp_path, CLASSES, n_train=2, n_val=1)
    samples = scan_split(root / "train")[1] + scan_split(root / "val")[1]
    bad_index = 5  # rank 1's share of 2 processes (odd indices)
    Path(samples[bad_index][0]).write_bytes(b"junk")
    opened = []
    real = imf.image_problem
    monkeypatch.setattr(imf, "image_problem", lambda p: opened.append(p) or real(p))
    seen_by_collective = []

    def other_rank_found(value):  # the all-reduce MIN with rank 1, which found index 5
        seen_by_collective.append(value)
        return min(value, bad_index)

    with pytest.raises(DataError, match=re.escape(samples[bad_index][0])):
        verify_images(samples, SharedCheck(rank=0, world=2, min_over_ranks=other_rank_found))
    assert seen_by_collective == [len(samples)]  # rank 0 found nothing in its share
    mine = [p for i, (p, _) in enumerate(samples) if i % 2 == 0]
    assert opened == [*mine, samples[bad_index][0]]  # its share, then the agreed file for the message
    # Rank 1 stops at its first bad file and reports its index.
    opened.clear()
    with pytest.raises(DataError):
        verify_images(samples, SharedCheck(rank=1, world=2, min_over_ranks=lambda v: v))
    assert opened[:3] == [samples[1][0], samples[3][0], samples[5][0]]


def test_image_changed_during_the_run_is_a_run_failure(tmp_path):
    for workers in (0, 1):
        root = make_folder(tmp_path / str(workers), CLASSES, n_train=2, n_val=1)
        loader = build_imagefolder(
            cfg_for(root, f"data.num_workers={workers}", "train.batch_size=6"), 0, 1, CPU
        ).train  # every file passed the start-up check
        bad = root / "train" / "dog" / "img1.png"
        bad.write_bytes(b"overwritten while the run went on")
        _FAILED_LOADERS.append(loader)
        with pytest.raises(DataFailure, match=re.escape(str(bad))) as err:
            collect(loader.epoch(0))
        assert isinstance(err.value, RunFailure) and err.value.exit_code == 1
        assert "\n" not in str(err.value) and "checkpoints are kept" in str(err.value)


def test_image_damaged_past_its_header_fails_the_run_not_the_start(tmp_path):
    root = make_folder(tmp_path, CLASSES, n_train=2, n_val=1)
    bad = root / "val" / "fox" / "img0.jpg"
    _truncated_jpeg(bad)
    bundle = build_imagefolder(cfg_for(root), 0, 1, CPU)  # the header check passes
    with pytest.raises(DataFailure, match=re.escape(str(bad))):
        collect(bundle.test.eval_batches(3))


def test_empty_class_folder_is_kept_as_a_class_with_one_warning(tmp_path):
    root = make_folder(tmp_path, ("ant", "cat", "dog"), n_train=2, n_val=1)
    for split in ("train", "val"):
        (root / split / "bee").mkdir()
        (root / split / "bee" / "readme.txt").write_text("no images here")
    warnings = []
    classes, samples = scan_split(root / "train", warnings)
    assert classes == ("ant", "bee", "cat", "dog")
    # labels follow the folder names: cat is 2, dog 3, as torchvision numbers them
    assert {Path(p).parent.name: y for p, y in samples} == {"ant": 0, "cat": 2, "dog": 3}
    assert len(warnings) == 1 and "bee" in warnings[0] and "\n" not in warnings[0], warnings
    bundle = build_imagefolder(cfg_for(root, "model.num_classes=4"), 0, 1, CPU)
    assert bundle.num_classes == 4 and len(bundle.warnings) == 2  # train/ and val/
    assert scan_split(make_folder(tmp_path / "full", CLASSES, n_train=1, n_val=1) / "train", warnings)
    assert len(warnings) == 1  # a folder without empty classes adds none


def test_directory_links_never_leave_the_class_folder_nor_loop(tmp_path):
    root = make_folder(tmp_path, CLASSES, n_train=2, n_val=1)
    train = root / "train"
    (train / "cat" / "loop").symlink_to("..")  # -> train/: every class, and itself
    (train / "cat" / "to_dog").symlink_to(train / "dog")  # another class's images
    (train / "cat" / "sub").mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(train / "cat" / "sub" / "deep.png")
    (train / "cat" / "again").symlink_to("sub")  # inside the class folder: would read sub/ twice
    warnings = []
    classes, samples = scan_split(train, warnings)
    cat = sorted(p for p, y in samples if y == classes.index("cat"))
    assert cat == sorted(
        [str(train / "cat" / "img0.jpg"), str(train / "cat" / "img1.png"), str(train / "cat" / "sub" / "deep.png")]
    )
    assert len(samples) == 2 * len(CLASSES) + 1
    assert len(warnings) == 1 and "3 directory link(s)" in warnings[0], warnings


def test_class_folder_linking_to_an_ancestor_is_refused(tmp_path):
    root = make_folder(tmp_path, CLASSES, n_train=2, n_val=1)
    (root / "train" / "eel").symlink_to(root)
    with pytest.raises(DataError, match="holds the split folder itself"):
        scan_split(root / "train")


def test_large_jpeg_draft_decode_keeps_the_shorter_side(tmp_path):
    from distalex.data.imagefolder import _load_rgb

    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 300, 3), dtype=np.uint8)).save(path)
    img = _load_rgb(str(path), RESIZE)
    assert min(img.size) >= RESIZE and img.size[0] < 300  # decoded at a reduced scale
    assert EvalTransform(RESIZE, S, ten_crop=False)(img).shape == (3, S, S)
