"""The uint8 ImageFolder pipeline (distalex/data/pixels.py): uint8 crops out of the workers,
the float work on the device identical to the older float pipeline for the same
(seed, epoch, index); a replica's processes each decoding a share; and the device-decode
path's logic (byte reading, batching, fallback routing, crop geometry), run here with the
decode call on the CPU."""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from distalex.config import load_config
from distalex.data import imagefolder
from distalex.data.common import GlobalBatchPlan, ReplicaShare
from distalex.data.imagefolder import ImageFolderLoader, eval_batches_of, scan_split
from distalex.data.pixels import (
    CropSamples,
    CropTransform,
    EncodedSamples,
    collate_encoded,
    decode_batch,
    my_share,
    pack_rows,
    resized_size,
    unpack_rows,
)
from distalex.errors import ConfigError, DataFailure

from helpers import ROOT, make_folder

spec = importlib.util.spec_from_file_location("input_pipeline", ROOT / "bench" / "input_pipeline.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

CPU = torch.device("cpu")
S, RESIZE, BATCH = 32, 40, 6


def cfg_of(*extra):
    return load_config(
        None,
        [
            "data.name=imagefolder",
            f"data.image_size={S}",
            f"data.resize_size={RESIZE}",
            "data.num_workers=0",
            "model.in_channels=3",
            "eval.ten_crop=true",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """make_folder's JPEGs and PNGs, plus photo-sized JPEGs (decoded at a reduced DCT scale),
    a grayscale JPEG and a CMYK JPEG."""
    root = make_folder(tmp_path_factory.mktemp("pixels") / "data", 3, n_train=4, n_val=2)
    rng = np.random.default_rng(1)
    d = root / "train" / "class0"
    for i, (w, h) in enumerate([(190, 150), (151, 203), (70, 61)]):  # the last one: no reduced scale
        Image.fromarray(bench.natural_image(rng, w, h)).save(d / f"photo{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (50, 60), dtype=np.uint8), mode="L").save(d / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).convert("CMYK").save(d / "cmyk.jpg")
    return root


def train_samples(root):
    return scan_split(root / "train")[1]


def loader(samples, *extra, replica=0, replicas=1, share=None, batch=BATCH) -> ImageFolderLoader:
    plan = GlobalBatchPlan(len(samples), batch, replica, replicas, seed=3)
    return ImageFolderLoader(samples, cfg_of(*extra), plan, CPU, share)


def test_workers_make_uint8_crops_and_the_device_side_equals_the_float_pipeline(folder):
    samples = train_samples(folder)
    new, old = loader(samples), loader(samples, "data.pipeline=float")
    crops = CropSamples(samples, new.crop_transform, seed=3)[(0, 1)]
    assert crops[0].dtype == torch.uint8 and crops[0].shape == (S, S, 3)  # what a worker ships
    assert crops[1].dtype == torch.float32 and crops[1].shape == (3,)  # with its lighting shift
    for epoch in (0, 1):
        ours, theirs = list(new.epoch(epoch)), list(old.epoch(epoch))
        assert len(ours) == len(theirs) == len(samples) // BATCH
        for (x, y), (x0, y0) in zip(ours, theirs, strict=True):
            assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
            assert_within_one_level(x, x0)
            assert torch.equal(y, y0)
    for ten in (True, False):
        new, old = (
            loader(samples, f"eval.ten_crop={ten}"),
            loader(samples, "data.pipeline=float", f"eval.ten_crop={ten}"),
        )
        for (x, y), (x0, y0) in zip(new.eval_batches(4), old.eval_batches(4), strict=True):
            assert x.shape[1:] == ((10, 3, S, S) if ten else (3, S, S)) and torch.equal(y, y0)
            assert_within_one_level(x, x0)


def assert_within_one_level(x, x0):
    """The uint8 pipeline's images against the float pipeline's for the same (seed, epoch,
    index): the same float operations on crops that differ by at most one uint8 level (the
    window's resize rounding), so |difference| <= 1/255 plus float32 rounding (1e-6), in a
    small fraction of the values; a shifted crop, a lost flip or lighting would break both."""
    diff = (x - x0).abs()
    assert diff.max() <= 1 / 255 + 1e-6, diff.max()
    assert (diff > 1e-6).float().mean() <= 0.01


def test_a_resumed_epoch_sees_the_same_batches(folder):
    samples = train_samples(folder)
    full = list(loader(samples).epoch(2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[1:], loader(samples).epoch(2, 1), strict=True))


@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 120))
@settings(max_examples=60, deadline=None)
def test_resized_size_is_torchvisions(w, h, size):
    assert resized_size(w, h, size) == TF.resize(Image.new("RGB", (w, h)), size).size


@given(st.integers(1, 9), st.integers(1, 4), st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_shares_cover_the_batch_and_rows_pack_both_ways(rows, members, width):
    batch = list(range(rows))
    shares = [my_share(batch, ReplicaShare(m, members)) for m in range(members)]
    assert len({len(s) for s in shares}) == 1  # equal parts: one all_gather
    assert sum(shares, [])[:rows] == batch
    fields = [
        torch.randint(0, 256, (rows, 3, width), dtype=torch.uint8),
        torch.randn(rows, 3),
        torch.randint(-(2**40), 2**40, (rows,)),
    ]
    back = unpack_rows(pack_rows(fields), fields)
    assert all(torch.equal(a, b) for a, b in zip(fields, back, strict=True))


def image_opens(monkeypatch) -> list:
    """The paths of every image file opened from now on: every image read goes through
    images.open_image_file's guarded open (tests/unit/test_guarded_reads.py keeps it so)."""
    from distalex.data import images

    opened, real = [], images.open_for_reading

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(images, "open_for_reading", counting)
    return opened


class Replica:
    """``members`` in-process members of one replica, gathering through a barrier."""

    def __init__(self, members: int):
        self.members, self.parts = members, {}
        self.barrier = threading.Barrier(members)

    def share(self, member: int, train_pixels: str = "all") -> ReplicaShare:
        def gather(part):
            self.parts[member] = part
            self.barrier.wait()
            out = torch.cat([self.parts[m] for m in range(self.members)])
            self.barrier.wait()
            return out

        return ReplicaShare(member, self.members, gather, train_pixels)


def run_members(members, fn):
    out, threads = [None] * members, []
    for m in range(members):
        threads.append(threading.Thread(target=lambda m=m: out.__setitem__(m, fn(m))))
        threads[-1].start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.parametrize("members", [2, 3])
def test_members_of_a_replica_decode_shares_and_all_get_the_whole_batch(folder, members, monkeypatch):
    samples = train_samples(folder)
    reference = [(x, y) for x, y in loader(samples).epoch(0)] + list(loader(samples).eval_batches(4))
    opened = image_opens(monkeypatch)
    replica = Replica(members)

    def member(m):
        one = loader(samples, share=replica.share(m))
        return list(one.epoch(0)) + list(one.eval_batches(4))

    for got in run_members(members, member):
        assert len(got) == len(reference)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, reference, strict=True))
    # Each row decoded once in the replica (plus the padding of unequal shares).
    batches = [BATCH] * (len(samples) // BATCH) + [len(b) for b in eval_batches_of(loader(samples).plan, 4)]
    assert len(opened) == sum(-(-n // members) * members for n in batches)
    assert sum(-(-n // members) * members - n for n in batches) < len(batches) * members


def test_pipeline_stages_the_first_decodes_alone_the_others_open_no_training_file(folder, monkeypatch):
    samples = train_samples(folder)
    reference = list(loader(samples).epoch(0))

    def no_gather(part):
        raise AssertionError("a pipeline's training batches are not gathered")

    first = list(loader(samples, share=ReplicaShare(0, 2, no_gather, "first")).epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, reference, strict=True))
    opened = image_opens(monkeypatch)
    later = list(loader(samples, share=ReplicaShare(1, 2, no_gather, "first")).epoch(0))
    assert opened == [] and len(later) == len(reference)
    for (x, y), (_, y0) in zip(later, reference, strict=True):
        assert x.numel() == 0 and torch.equal(y, y0)


# --------------------------------------------------------------------------- data.decode=gpu, on the CPU


def encoded_items(samples, epoch=0):
    crop = CropTransform(RESIZE, S, imagefolder.PCALighting(0.1))
    ds = EncodedSamples(samples, crop, seed=3)
    return [ds[(i, epoch)] for i in range(len(samples))]


def test_rgb_jpegs_go_to_the_device_and_every_other_file_is_decoded_in_the_worker(folder):
    samples = train_samples(folder)
    kinds = {p.rsplit("/", 1)[1]: item[0] for (p, _), item in zip(samples, encoded_items(samples), strict=True)}
    assert kinds["photo0.jpg"] == kinds["photo1.jpg"] == kinds["img0.jpg"] == "jpeg"
    assert kinds["gray.jpg"] == kinds["cmyk.jpg"] == kinds["img1.png"] == "crop"


CUDA = pytest.param(
    torch.device("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_device_decode_gives_the_cpu_paths_crops(folder, device):
    """The same rows, draws and geometry as data.decode=cpu; the pixels differ only by the
    decoders' and resizers' rounding (a full-size decode + tensor resize against the CPU path's
    reduced-DCT-scale decode + PIL's resize) -- here with the decode call on the CPU
    (libjpeg-turbo) and, where there is one, on CUDA (nvJPEG: the geometry only; its pixel bound
    is measured by the GPU check bench/gpu_decode_check.py)."""
    samples = train_samples(folder)
    items = encoded_items(samples, epoch=1)
    batch = collate_encoded(items)
    got = decode_batch(batch, S, device).cpu()
    crop = CropTransform(RESIZE, S, imagefolder.PCALighting(0.1))
    cpu = CropSamples(samples, crop, seed=3)
    for row, (path, label) in enumerate(samples):
        ref, shift, _ = cpu[(row, 1)]
        assert torch.equal(batch.shifts[row], shift) and batch.labels[row] == label
        if items[row][0] == "crop":  # decoded in the worker by the CPU path's own code
            assert torch.equal(got[row], ref), path
            continue
        a, b = got[row].permute(2, 0, 1).int(), ref.permute(2, 0, 1).int()
        diff = (a - b).abs().float().mean()
        # The geometry: a window one pixel off, or a lost flip, is far further away.
        assert diff < 0.5 * (a[..., 1:] - b[..., :-1]).abs().float().mean(), path
        assert diff < 0.5 * (a[..., 1:, :] - b[..., :-1, :]).abs().float().mean(), path
        assert diff < 0.5 * (a.flip(-1) - b).abs().float().mean(), path
        if device.type == "cuda":
            continue
        with Image.open(path) as im:
            full = im.size
            im.draft("RGB", (RESIZE, RESIZE))
            reduced = im.size != full
        # Measured: at most 1 level without a reduced scale (also at ImageNet's 500x375 -> 256),
        # a mean under 4 levels from a half or quarter scale.
        if reduced:
            assert diff <= 5.0, (path, diff)
        else:
            assert (a - b).abs().max() <= 2, (path, (a - b).abs().max())


def test_a_file_the_batched_decode_refuses_is_decoded_alone_or_on_the_cpu(folder, monkeypatch):
    import torchvision.io

    samples = train_samples(folder)
    batch = collate_encoded(encoded_items(samples))
    expected = decode_batch(batch, S, CPU)
    real = torchvision.io.decode_jpeg
    calls = []

    def picky(data, mode=None, device="cpu"):
        calls.append(type(data).__name__)
        if isinstance(data, list) and (len(data) > 1 or data[0] is batch.jpegs[0]):  # as nvJPEG on one bad file
            raise RuntimeError("unsupported JPEG")
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    assert torch.equal(decode_batch(batch, S, CPU), expected)
    assert calls.count("Tensor") == 1  # the refused file, alone on the CPU


def test_gpu_decode_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="data.decode.*CUDA"):
        imagefolder.decode_on("gpu", CPU)
    assert imagefolder.decode_on("auto", CPU) == "cpu" and imagefolder.decode_on("auto", torch.device("cuda")) == "gpu"
    with pytest.raises(ConfigError, match="data.pipeline=uint8"):
        cfg_of("data.pipeline=float", "data.decode=gpu")


def test_every_augmentation_draw_goes_through_draw_crop():
    """One mechanism for a sample's random draws: in distalex/data, torch's random functions
    are called only by draw_crop, the lighting's own draw (which draw_crop calls) and the
    synthetic set's generator -- a new path cannot draw its own numbers and drift from the rest."""
    import ast

    from helpers import ROOT

    allowed = {("pixels.py", "draw_crop"), ("imagefolder.py", "offset"), ("synthetic.py", "make_synthetic")}
    found = set()
    for path in (ROOT / "distalex" / "data").glob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("rand", "randn", "randint", "randperm", "normal", "bernoulli")
                    and getattr(node.func.value, "id", None) == "torch"
                ):
                    found.add((path.name, fn.name))
    assert found - {("common.py", "epoch_permutation")} <= allowed, found


# --------------------------------------------------------------------------- the CPU half's pieces


def jpeg_variants(tmp_path) -> list:
    """JPEG encodings PIL writes (baseline 4:2:0, 4:4:4, 4:2:2, progressive, optimized Huffman
    tables, restart markers, RGB without the YCbCr transform, a tiny one), each decoded by both
    decoders in the tests below."""
    rng = np.random.default_rng(5)
    options = [
        {"quality": 90},
        {"quality": 75, "subsampling": 0},
        {"quality": 95, "subsampling": 1},
        {"quality": 85, "progressive": True},
        {"quality": 80, "optimize": True},
        {"quality": 70, "restart_marker_blocks": 4},
        {"quality": 90, "keep_rgb": True},  # RGB, not YCbCr (an Adobe marker says so)
    ]
    paths = []
    for i, kw in enumerate(options):
        w, h = (37, 23) if i == len(options) - 1 else (int(rng.integers(120, 300)), int(rng.integers(120, 300)))
        path = tmp_path / f"v{i}.jpg"
        Image.fromarray(bench.natural_image(rng, w, h)).save(path, **kw)
        paths.append(str(path))
    return paths


def test_decode_pixels_gives_the_pixels_pil_gives(folder, tmp_path, monkeypatch):
    """decode_pixels (torchvision's libjpeg-turbo for full-scale RGB JPEGs, PIL for the rest) is
    bit-identical to the float pipeline's PIL decode, file by file: every kind in the test folder
    (reduced-scale photos, grayscale, CMYK, PNG) and every JPEG encoding PIL writes."""
    from distalex.data import pixels

    paths = [p for p, _ in train_samples(folder)] + jpeg_variants(tmp_path)
    taken = []
    real = pixels.decode_jpeg_cpu
    monkeypatch.setattr(pixels, "decode_jpeg_cpu", lambda data: taken.append(1) or real(data))
    for path in paths:
        data = pixels.read_bytes(path)
        got = pixels.decode_pixels(data, path, RESIZE)
        want = torch.from_numpy(np.array(imagefolder._load_rgb(path, RESIZE)))
        assert got.dtype == torch.uint8 and torch.equal(got, want), path
    assert len(taken) >= 8  # the torchvision path was taken (img*.jpg, the small photo, the variants)

    # A file torchvision refuses goes to PIL, whose pixels (or refusal) stand.
    monkeypatch.setattr(pixels, "decode_jpeg_cpu", lambda data: (_ for _ in ()).throw(RuntimeError("refused")))
    path = paths[-1]
    assert torch.equal(pixels.decode_pixels(pixels.read_bytes(path), path, RESIZE), want)
    truncated = pixels.read_bytes(path)[:-40]
    with pytest.raises(DataFailure, match="cannot be read during the run"):
        pixels.decode_pixels(truncated, path, RESIZE)


# Generated images and crops: an image's size, the resize of its shorter side, the crop's size
# and position (fractions of the room it has), the pixels' seed.
CROPS = dict(
    width=st.integers(1, 160),
    height=st.integers(1, 160),
    resize=st.integers(1, 120),
    size=st.integers(1, 120),
    fy=st.floats(0, 1),
    fx=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)


def crop_at(width, height, resize, size, fy, fx) -> tuple[int, int, int, int, int]:
    """(resized width, resized height, crop size, top, left) of a generated crop."""
    w, h = resized_size(width, height, resize)
    size = min(size, w, h)
    return w, h, size, int(fy * (h - size)), int(fx * (w - size))


@given(**CROPS)
# a prefix as long as its resize, which torch would skip:
@example(width=71, height=191, resize=74, size=38, fy=22.5 / 161, fx=6.5 / 36, seed=0)
@settings(max_examples=120, deadline=None)
def test_resize_crop_is_the_whole_images_resize_cropped(width, height, resize, size, fy, fx, seed):
    """resize_crop resamples a prefix of the image only; the crop it returns is exactly the crop
    of the whole image's resize by the same kernel (torch's when shrinking, PIL's when
    enlarging), and within two levels of PIL's whole resize either way."""
    from distalex.data.pixels import resize_crop

    w, h, size, top, left = crop_at(width, height, resize, size, fy, fx)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    got = resize_crop(torch.from_numpy(a), resize, top, left, size)
    pil = torch.from_numpy(np.array(Image.fromarray(a).resize((w, h), Image.BILINEAR)))
    pil = pil[top : top + size, left : left + size]
    if h > height or w > width:
        whole = pil
    else:
        x = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)
        whole = torch.ops.aten._upsample_bilinear2d_aa(x, [h, w], False, None, None)[0].permute(1, 2, 0)
        whole = whole[top : top + size, left : left + size]
    assert got.shape == (size, size, 3) and torch.equal(got, whole)
    assert (got.int() - pil.int()).abs().max() <= 2


def test_the_torch_resampler_stays_within_two_levels_of_the_float_pipeline(folder):
    samples = train_samples(folder)
    fast, old = loader(samples, "data.resampler=torch"), loader(samples, "data.pipeline=float")
    for (x, y), (x0, y0) in zip(fast.epoch(1), old.epoch(1), strict=True):
        assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, y0)
        diff = (x - x0).abs()
        assert diff.max() <= 2 / 255 + 1e-6, diff.max()
        assert (diff > 1e-6).float().mean() <= 0.05  # test-folder noise images: ~2 %; photos: ~0.2 %


@given(
    st.integers(1, 4),
    st.integers(1, 23),
    st.booleans(),
    st.sampled_from(["hwc", "chw"]),
    st.integers(0, 2**31),
)
@settings(max_examples=60, deadline=None)
def test_finish_batch_is_the_per_image_arithmetic_in_any_layout(rows, size, lighting, layout, seed):
    """finish_batch against the per-image formula written out in plain torch (to_tensor's
    ``/255``, ``+ shift``, ``- mean``, in that order), bit for bit, whatever the input's layout
    and the output's memory format -- sizes whose pixel count has no divisor to tile by included."""
    from distalex.data.pixels import finish_batch

    g = torch.Generator().manual_seed(seed)
    hwc = torch.randint(0, 256, (rows, size, size, 3), dtype=torch.uint8, generator=g)
    pixels = hwc.permute(0, 3, 1, 2) if layout == "hwc" else hwc.permute(0, 3, 1, 2).contiguous()
    shifts = torch.randn(rows, 3, generator=g) * 0.1 if lighting else None
    mean = (0.485, 0.456, 0.406)
    want = torch.stack(
        [
            (p.float() / 255 + (shifts[i].view(3, 1, 1) if lighting else 0)) - torch.tensor(mean).view(3, 1, 1)
            for i, p in enumerate(pixels)
        ]
    )
    for fmt in (torch.channels_last, torch.contiguous_format):
        got = finish_batch(pixels, shifts, mean, fmt)
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)
        assert torch.equal(got, want)


@given(**CROPS)
@settings(max_examples=120, deadline=None)
def test_pils_window_is_its_whole_resize_within_a_level_a_pass(width, height, resize, size, fy, fx, seed):
    """data.resampler=pil's resize (and the evaluation centre crop's): PIL's resize of the window
    against PIL's resize of the whole image, cropped -- what the float pipeline computes.  The
    window's sample positions are the whole image's up to floating-point rounding, which can move
    a value across a rounding edge in each of the two passes: two levels at most (found here on
    noise images; photos stay within one, test_workers_make_uint8_crops_...)."""
    from distalex.data.pixels import resized_window

    w, h, size, top, left = crop_at(width, height, resize, size, fy, fx)
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    box = (left, top, left + size, top + size)
    got = np.asarray(resized_window(img, w, h, box)).astype(int)
    whole = np.asarray(img.resize((w, h), Image.BILINEAR).crop(box)).astype(int)
    assert got.shape == (size, size, 3) and np.abs(got - whole).max() <= 2
    assert np.abs(got - whole).mean() <= 0.5  # a window a pixel off differs by tens of levels on noise
