"""The ImageFolder input pipeline in two halves: uint8 crops on the CPU, the float work on the device.

CPU (DataLoader workers): decode (JPEGs at a reduced DCT scale), resize the shorter side --
only as far as the crop needs: PIL's resize of the crop's window (``data.resampler=pil``, the
default) or torch's uint8 kernel on a tensor decoded without PIL's copies (``torch``,
:func:`resize_crop`) --, crop, flip: integer work whose output is a uint8 crop in
height-width-channel order, a quarter of the bytes of the float crop the older pipeline made
there.  Device (batched, where the network trains): the dtype change, PCA lighting and the mean,
written straight into the network's memory layout (:func:`finish_batch`).  The float arithmetic
is the older pipeline's per-image operations in its order (``to_tensor`` = ``/255``, ``+ shift``,
``- mean``), so the two differ only where the resize rounds a pixel to another uint8 level than
PIL's whole-image resize: one level in about 0.1 % (``pil``) or 0.2 % (``torch``) of a photo's
values, at most two levels on any image (tests/unit/test_pixels.py: one level per resampling
pass; PIL places a window in single precision, torch's kernel has 16-bit weights).

A sample's random draws (crop position, flip, lighting) come from one generator of
``(seed, epoch, index)`` (:func:`draw_crop`), which every path calls: the legacy float
transform, the uint8 crops and the geometry the device-decode path ships.  The lighting
shift is drawn in the worker and travels with the crop (12 bytes), so the device side needs
no generator.

``data.decode=gpu`` (:class:`EncodedSamples`): the workers read each file's bytes and parse
its header; an RGB JPEG is decoded batched on the device (``torchvision.io.decode_jpeg``)
and resized and cropped there with the geometry the CPU path would use; every other file
(PNG, grayscale or CMYK JPEG, ...) is decoded and cropped on the CPU in the worker, as in
``data.decode=cpu``, and both kinds meet in one uint8 batch (:func:`decode_batch`).

In a replica of several processes (model-parallel towers, pipeline stages) each process
decodes a share of every batch and the uint8 rows reach the others through
``ReplicaShare.gather`` (:func:`gather_rows`): each image decoded once per replica.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from distalex.data.common import ReplicaShare
from distalex.data.images import UNREADABLE, open_image_file, to_mode
from distalex.errors import DataFailure

# The per-row fields a shared batch carries besides its pixels: the lighting shift (3 float32)
# and the label (int64).
EXTRA_ROW_BYTES = 3 * 4 + 8


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one training sample's augmentation: a function of
    (seed, epoch, index) only, so workers and resumes reproduce it."""
    key = ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(key)


def ten_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """[C, H, W] -> [10, C, size, size]: crops 0..4 are top-left, top-right,
    bottom-left, bottom-right and centre (torchvision's ``five_crop`` order);
    crop ``k + 5`` is the horizontal mirror of crop ``k``."""
    five = torch.stack(TF.five_crop(img, [size, size]))
    return torch.cat([five, five.flip(-1)])


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size``: torchvision's rule for an
    integer size (``TF.resize``; tested against it), which the device-decode path needs before
    it has the pixels."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def draw_crop(g: torch.Generator, width: int, height: int, size: int, lighting) -> tuple[int, int, bool, torch.Tensor]:
    """One training sample's draws from its generator, in this order: (top, left, flip,
    lighting shift [3]) of a ``size`` crop of a ``width`` x ``height`` image.  Every path
    draws through here, so all of them see the same numbers."""
    top = int(torch.randint(0, height - size + 1, (1,), generator=g))
    left = int(torch.randint(0, width - size + 1, (1,), generator=g))
    flip = bool(torch.rand(1, generator=g) < 0.5)
    shift = lighting.offset(g) if lighting.sigma else torch.zeros(3)
    return top, left, flip, shift


def resized_window(img: Image.Image, width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """The ``box`` (left, top, right, bottom) of ``img`` resized to ``width`` x ``height``, computing
    only the box's pixels when shrinking: PIL's bilinear resize of the whole image then cropped,
    at a fraction of the cost.  The same filter; the sample positions differ only by PIL taking
    a box's corners in single precision, which moves about 0.1 % of a photo's values one level
    (noise images at some scales: more, and up to two levels, one per pass;
    tests/unit/test_pixels.py).  Enlarging (an image smaller than the resize), the window strays
    further, so the whole image is resized and cropped: such images are small."""
    left, top, right, bottom = box
    if width > img.size[0] or height > img.size[1]:
        return img.resize((width, height), Image.BILINEAR).crop(box)
    sx, sy = img.size[0] / width, img.size[1] / height
    size = (right - left, bottom - top)
    return img.resize(size, Image.BILINEAR, box=(left * sx, top * sy, right * sx, bottom * sy))


def decode_jpeg_cpu(data: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] (its memory height-width-channel) of an RGB JPEG's bytes, by torchvision's
    libjpeg-turbo; RuntimeError for a file it refuses."""
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; decode_jpeg still works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB)


def pil_pixels(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as uint8 [H, W, 3]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def decode_rgb(data: bytes, path: str, min_side: int) -> Image.Image:
    """An image file's bytes -> the RGB PIL image the float pipeline decodes (JPEGs at a reduced
    DCT scale while both sides stay >= ``min_side``; the conversions prediction makes too)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (min_side, min_side))
            return to_mode(im, "RGB")[0]
    except UNREADABLE as exc:
        raise _failure(path, exc) from None


def decode_pixels(data: bytes, path: str, min_side: int) -> torch.Tensor:
    """:func:`decode_rgb`'s pixels as uint8 [H, W, 3].  An RGB JPEG that PIL would decode at full
    scale is decoded by torchvision's libjpeg-turbo straight into a tensor: the same library, DCT
    method and upsampling as PIL's (equal pixels, tests/unit/test_pixels.py), without PIL's
    copies out of its image; a file it refuses goes to PIL, whose verdict stands."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            full = im.size
            im.draft("RGB", (min_side, min_side))  # only sets the DCT scale; nothing is decoded yet
            if device_decodable(im) and im.size == full:
                try:
                    return decode_jpeg_cpu(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0)
                except RuntimeError:
                    pass
            return pil_pixels(to_mode(im, "RGB")[0])
    except UNREADABLE as exc:
        raise _failure(path, exc) from None


def _prefix(out_needed: int, out_total: int, scale: float, in_total: int) -> tuple[int, int]:
    """(output, input) lengths of a prefix resize along one dimension: the input reaches the last
    pixel the last needed output pixel reads -- its centre ``scale * (i + 0.5)`` plus the filter's
    support (the scale when shrinking, one pixel when enlarging), rounded up, plus one.  torch
    skips a dimension whose input and output lengths are equal (an identity, whatever the scale
    given), so they are made to differ unless the whole image's resize is that identity."""
    n_in = min(in_total, math.ceil(scale * out_needed + max(scale, 1.0)) + 1)
    n_out = out_needed
    if n_in == n_out and in_total != out_total:
        if n_out < out_total:
            n_out += 1  # one more output pixel, cut off after
        else:
            n_in += 1  # n_in = out_total != in_total and <= in_total: there is one more
    return n_out, n_in


def resize_crop(pixels: torch.Tensor, resize_size: int, top: int, left: int, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> the ``size`` crop at (top, left) of the image with its shorter side
    resized to ``resize_size``: antialiased bilinear, PIL's filter and sample positions, by
    torch's uint8 kernel when shrinking (its 16-bit weights: within one level of PIL's per pass,
    two levels over both, in about 0.2 % of a photo's values), by PIL when enlarging.  Only the
    rows and columns up to the crop's far edge are resampled: the kernel maps output pixel ``i``
    to input ``scale * (i + 0.5)`` from the input's origin, so a prefix of the resized image is
    a resize of a prefix of the input, given the whole image's scales."""
    height, width = pixels.shape[:2]
    w, h = resized_size(width, height, resize_size)
    if h > height or w > width:
        # Enlarging (an image smaller than resize_size): torch's uint8 kernel rounds up to two
        # levels away from PIL's there (measured); these few small images take PIL's resize.
        img = resized_window(Image.fromarray(pixels.numpy()), w, h, (left, top, left + size, top + size))
        return pil_pixels(img)
    out_rows, in_rows = _prefix(top + size, h, height / h, height)
    out_cols, in_cols = _prefix(left + size, w, width / w, width)
    prefix = pixels[:in_rows, :in_cols].permute(2, 0, 1).unsqueeze(0)  # a channels-last view
    out = torch.ops.aten._upsample_bilinear2d_aa(prefix, [out_rows, out_cols], False, h / height, w / width)
    return out[0, :, top : top + size, left : left + size].permute(1, 2, 0)


class CropTransform:
    """Image + generator -> (uint8 [S, S, 3] crop, float32 [3] lighting shift): the CPU half.
    The shorter side resized to ``resize_size`` and the crop taken from it, as the float pipeline
    does, resampling only what the crop needs.  ``resampler`` (``data.resampler``): ``pil`` --
    PIL's resize of the crop's window (:func:`resized_window`) on a PIL-decoded image; ``torch``
    -- :func:`resize_crop` on a tensor (:func:`decode_pixels`)."""

    def __init__(self, resize_size: int, image_size: int, lighting, resampler: str = "pil"):
        self.resize_size, self.image_size, self.lighting = resize_size, image_size, lighting
        self.resampler = resampler

    def decode(self, data: bytes, path: str):
        """The file's image in the form this resampler takes."""
        if self.resampler == "torch":
            return decode_pixels(data, path, self.resize_size)
        return decode_rgb(data, path, self.resize_size)

    def __call__(self, image, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``image``: an RGB PIL image or uint8 [H, W, 3] (converted if the resampler takes the other)."""
        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            height, width = image.shape[:2]
        w, h = resized_size(width, height, self.resize_size)
        s = self.image_size
        top, left, flip, shift = draw_crop(g, w, h, s, self.lighting)
        if self.resampler == "torch":
            pixels = pil_pixels(image) if isinstance(image, Image.Image) else image
            x = resize_crop(pixels, self.resize_size, top, left, s)
        else:
            img = image if isinstance(image, Image.Image) else Image.fromarray(image.numpy())
            x = pil_pixels(resized_window(img, w, h, (left, top, left + s, top + s)))
        return (x.flip(1) if flip else x.contiguous()), shift


class CropSamples(Dataset):
    """Training samples of the uint8 pipeline, indexed by ``(index, epoch)``: (uint8 [S, S, 3]
    crop, float32 [3] lighting shift, label); the one open of each file is :func:`read_bytes`."""

    def __init__(self, samples, crop: CropTransform, seed: int):
        self.samples, self.crop, self.seed = samples, crop, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path, label = self.samples[index]
        image = self.crop.decode(read_bytes(path), path)
        return (*self.crop(image, sample_generator(self.seed, epoch, index)), label)


class EvalCrops:
    """PIL image -> uint8 [3, S, S] (centre crop) or [10, 3, S, S] (ten crops): the CPU half
    of :class:`~distalex.data.imagefolder.EvalTransform` (cropping commutes with ``to_tensor``)."""

    def __init__(self, resize_size: int, image_size: int, ten_crop: bool):
        self.resize_size, self.image_size, self.ten_crop = resize_size, image_size, ten_crop

    def __call__(self, img: Image.Image) -> torch.Tensor:
        s = self.image_size
        if self.ten_crop:
            return ten_crop(TF.pil_to_tensor(TF.resize(img, self.resize_size)), s)
        w, h = resized_size(*img.size, self.resize_size)
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))  # TF.center_crop's corner
        return TF.pil_to_tensor(resized_window(img, w, h, (left, top, left + s, top + s)))


def finish_batch(
    pixels: torch.Tensor,
    shifts: torch.Tensor | None,
    mean: Sequence[float],
    memory_format=torch.contiguous_format,
) -> torch.Tensor:
    """uint8 [B, 3, S, S] of any memory layout (or [B, 10, 3, S, S]) on the device -> the float
    input the network sees: ``x / 255 + shift - mean``, the older pipeline's per-image operations
    in its order (``to_tensor``, :class:`PCALighting`, ``subtract_mean``), batched, in
    ``memory_format``.  ``shifts``: [B, 3] lighting shifts (None: no lighting, evaluation)."""
    if pixels.dim() == 4 and memory_format == torch.channels_last:
        hwc = pixels.permute(0, 2, 3, 1).contiguous()  # no copy for the training crops (made HWC)
        rows, height, width, _ = hwc.shape
        out = _finish_channels_last(hwc.view(rows, height * width, 3), shifts, mean)
        return out.view(rows, height, width, 3).permute(0, 3, 1, 2)
    # Channel-first: the float ops on the contiguous NCHW tensor (long inner loops), then the
    # layout change once.
    x = pixels.contiguous().float().div_(255.0)
    if shifts is not None:
        per_row = (-1, *([1] * (x.dim() - 4)), 3, 1, 1)  # one shift per row (each of its ten crops)
        x.add_(shifts.to(x.device, x.dtype).view(per_row))
    x.sub_(torch.tensor(mean, dtype=x.dtype).to(x.device).view(3, 1, 1))
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


def _finish_channels_last(hwc: torch.Tensor, shifts: torch.Tensor | None, mean: Sequence[float]) -> torch.Tensor:
    """uint8 [B, P, 3] (pixels, channels innermost) -> float32 ``x / 255 + shift - mean``.

    The per-channel operands repeat every 3 values; broadcast as [3] they would make the inner
    loop 3 long (measured 3x slower on a CPU), so the values are viewed ``k`` pixels a line
    ([B, P/k, 3k]) against operands tiled ``k`` times: the same float32 operation on every value,
    with vector-long inner loops.  On a CPU each row goes through the three passes while it is
    in cache; a GPU takes the batch at once."""
    rows, pixels = hwc.shape[:2]
    k = max(d for d in range(1, 33) if pixels % d == 0)
    src = hwc.view(rows, pixels // k, 3 * k)
    out = torch.empty(src.shape, dtype=torch.float32, device=hwc.device)
    mean_k = torch.tensor(mean, dtype=torch.float32).repeat(k).to(hwc.device)
    shift_k = None if shifts is None else shifts.to(hwc.device, torch.float32).repeat(1, k).view(rows, 1, 3 * k)
    step = 1 if hwc.device.type == "cpu" else rows
    for a in range(0, rows, step):
        o = out[a : a + step]
        torch.div(src[a : a + step], 255.0, out=o)  # to_tensor's float(v) / 255, in one pass
        if shift_k is not None:
            o.add_(shift_k[a : a + step])
        o.sub_(mean_k)
    return out.view(rows, pixels, 3)


# --------------------------------------------------------------------------- sharing a replica's batches


def share_rows(rows: int, members: int) -> int:
    """Rows each of ``members`` processes decodes of a batch of ``rows``: equal shares (the
    last ones padded with repeats of the batch's last row), so the gather is of equal parts."""
    return -(-rows // members)


def my_share(batch: list, share: ReplicaShare) -> list:
    """This process's rows of ``batch`` (padded to :func:`share_rows` with the last row)."""
    c = share_rows(len(batch), share.members)
    part = batch[share.member * c : (share.member + 1) * c]
    return part + [batch[-1]] * (c - len(part))


def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors of the same rows (dim 0) as one uint8 [rows, bytes] tensor: one collective for all."""
    rows = parts[0].shape[0]
    return torch.cat([p.contiguous().view(rows, -1).view(torch.uint8) for p in parts], dim=1)


def unpack_rows(packed: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`pack_rows`' inverse for any number of rows, given tensors of the fields' dtypes and row shapes."""
    rows, out, at = packed.shape[0], [], 0
    for t in like:
        n = math.prod(t.shape[1:]) * t.element_size()
        field = packed[:, at : at + n].reshape(-1)
        # A wider dtype needs its own aligned storage (a copy of a few bytes a row); bytes do not.
        field = field.clone() if t.element_size() > 1 else field
        out.append(field.view(t.dtype).view(rows, *t.shape[1:]))
        at += n
    return out


def gather_rows(parts: Sequence[torch.Tensor], rows: int, share: ReplicaShare) -> list[torch.Tensor]:
    """Every member's share of a batch (``parts``: this one's, on the device), concatenated in
    member order and cut to the batch's ``rows``: the whole batch on every member."""
    packed = share.gather(pack_rows(parts))
    return [t[:rows] for t in unpack_rows(packed, parts)]


# --------------------------------------------------------------------------- data.decode=gpu


def read_bytes(path: str) -> bytes:
    """The file's bytes (the one open of a sample's file in the device-decode path), through
    the guarded reader: a file that became a FIFO or grew past an image's cap since the
    start-up check stops the run with one line."""
    try:
        with open_image_file(path, DataFailure) as fh:
            return fh.read()
    except DataFailure as exc:
        raise _failure(path, exc.reason) from None
    except OSError as exc:
        raise _failure(path, exc) from None


def _failure(path: str, exc: BaseException) -> DataFailure:
    return DataFailure(
        f"image {path} cannot be read during the run ({exc}); it passed the start-up check, so it "
        f"changed or is damaged past its header; the run stops, its checkpoints are kept"
    )


class Encoded(NamedTuple):
    """A batch as the device-decode workers ship it (pinned by the DataLoader on CUDA)."""

    jpegs: list  # uint8 1-D file bytes of the rows decoded on the device
    geometry: torch.Tensor  # int64 [len(jpegs), 6]: row, resized h, resized w, top, left, flip
    crops: torch.Tensor  # uint8 [k, S, S, 3]: the rows decoded on the CPU (not RGB JPEGs)
    crop_rows: torch.Tensor  # int64 [k]
    shifts: torch.Tensor  # float32 [B, 3]
    labels: torch.Tensor  # int64 [B]


def device_decodable(im: Image.Image) -> bool:
    """Whether the device decodes this file: a one-frame JPEG of three YCbCr channels (what
    nvJPEG and libjpeg-turbo both turn into RGB).  Grayscale and CMYK JPEGs, PNGs and every
    other format are decoded on the CPU."""
    return im.format == "JPEG" and im.mode == "RGB" and getattr(im, "n_frames", 1) == 1


class EncodedSamples(CropSamples):
    """:class:`CropSamples`' files and draws for ``data.decode=gpu``; yields ``("jpeg", bytes,
    geometry, shift, label)`` or ``("crop", uint8 crop, None, shift, label)``."""

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path, label = self.samples[index]
        g = sample_generator(self.seed, epoch, index)
        data = read_bytes(path)
        r, s = self.crop.resize_size, self.crop.image_size
        try:
            with Image.open(io.BytesIO(data)) as im:
                if device_decodable(im):
                    # The size the CPU path resizes from: its reduced-DCT-scale decode (draft
                    # only sets the scale; nothing is decoded here).
                    im.draft("RGB", (r, r))
                    w, h = resized_size(*im.size, r)
                    top, left, flip, shift = draw_crop(g, w, h, s, self.crop.lighting)
                    geometry = torch.tensor([h, w, top, left, int(flip)])
                    return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), geometry, shift, label
                im.draft("RGB", (r, r))
                img = to_mode(im, "RGB")[0]
        except UNREADABLE as exc:
            raise _failure(path, exc) from None
        x, shift = self.crop(img, g)
        return "crop", x, None, shift, label


def collate_encoded(items) -> Encoded:
    jpeg = [(row, it) for row, it in enumerate(items) if it[0] == "jpeg"]
    crop = [(row, it) for row, it in enumerate(items) if it[0] == "crop"]
    geometry = torch.stack([torch.cat([torch.tensor([row]), it[2]]) for row, it in jpeg]) if jpeg else None
    return Encoded(
        jpegs=[it[1] for _, it in jpeg],
        geometry=geometry if geometry is not None else torch.zeros((0, 6), dtype=torch.int64),
        crops=torch.stack([it[1] for _, it in crop]) if crop else torch.zeros((0, 0, 0, 3), dtype=torch.uint8),
        crop_rows=torch.tensor([row for row, _ in crop], dtype=torch.int64),
        shifts=torch.stack([it[3] for it in items]),
        labels=torch.tensor([it[4] for it in items], dtype=torch.int64),
    )


def crop_decoded(img: torch.Tensor, geometry: Sequence[int], size: int) -> torch.Tensor:
    """uint8 [3, H, W] decoded at full size -> the uint8 crop: resized (antialiased bilinear,
    uint8 out, like PIL's) to the CPU path's resized size, cropped at its position, flipped."""
    h, w, top, left, flip = (int(v) for v in geometry)
    x = TF.resize(img, [h, w], antialias=True)[:, top : top + size, left : left + size]
    return x.flip(-1) if flip else x


def _decode_one(data: torch.Tensor, device: torch.device, decode_jpeg, mode) -> torch.Tensor:
    try:
        return decode_jpeg([data], mode=mode, device=device)[0]
    except RuntimeError:
        return decode_jpeg(data.cpu(), mode=mode).to(device)


def decode_batch(batch: Encoded, size: int, device: torch.device) -> torch.Tensor:
    """uint8 [B, S, S, 3] on ``device`` (the CPU path's layout): the JPEGs decoded there in one
    batched call, the CPU-decoded rows copied in."""
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; decode_jpeg still works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    rows = batch.labels.shape[0]
    out = torch.empty((rows, size, size, 3), dtype=torch.uint8, device=device)
    if batch.crop_rows.numel():
        out[batch.crop_rows.to(device)] = batch.crops.to(device, non_blocking=True)
    if batch.jpegs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                images = decode_jpeg(list(batch.jpegs), mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                # One file the device decoder refuses (a JPEG feature nvJPEG lacks) must not stop
                # the batch: each file alone, and the ones it still refuses on the CPU (the same
                # libjpeg-turbo the CPU path uses), moved to the device.
                images = [_decode_one(data, device, decode_jpeg, ImageReadMode.RGB) for data in batch.jpegs]
        for img, geo in zip(images, batch.geometry.tolist(), strict=True):
            out[geo[0]] = crop_decoded(img, geo[1:], size).permute(1, 2, 0)
    return out
