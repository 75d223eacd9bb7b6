"""The ImageFolder input pipeline in two halves: uint8 crops on the CPU, the float work on the device.

CPU (DataLoader workers): decode (JPEGs at a reduced DCT scale), resize the shorter side
(only the crop's window of it, :func:`resized_window`), crop, flip -- integer work whose
output is a uint8 crop, a quarter of the bytes of the float crop the older pipeline made
there.  Device (batched, where the network trains): the dtype change, PCA lighting, the mean
and the memory layout (:func:`finish_batch`).  The float arithmetic is the older pipeline's
per-image operations in its order (``to_tensor`` = ``/255``, ``+ shift``, ``- mean``), so the
two differ only where the window's resize rounds a pixel to the other uint8 level: at most
1/255, in about 0.1 % of the values (tests/unit/test_pixels.py).

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
    only the box's pixels: PIL's bilinear resize of the whole image then cropped, at a fraction of
    the cost (the same filter and sample positions; intermediate rounding may differ by one level
    in about 0.1 % of pixels; tests/unit/test_pixels.py)."""
    sx, sy = img.size[0] / width, img.size[1] / height
    left, top, right, bottom = box
    size = (right - left, bottom - top)
    return img.resize(size, Image.BILINEAR, box=(left * sx, top * sy, right * sx, bottom * sy))


class CropTransform:
    """PIL image + generator -> (uint8 [3, S, S] crop, float32 [3] lighting shift): the CPU half.
    The shorter side resized to ``resize_size`` and the crop taken from it, as the float pipeline
    does, but only the crop's pixels are resized (:func:`resized_window`)."""

    def __init__(self, resize_size: int, image_size: int, lighting):
        self.resize_size, self.image_size, self.lighting = resize_size, image_size, lighting

    def __call__(self, img: Image.Image, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        w, h = resized_size(*img.size, self.resize_size)
        s = self.image_size
        top, left, flip, shift = draw_crop(g, w, h, s, self.lighting)
        x = TF.pil_to_tensor(resized_window(img, w, h, (left, top, left + s, top + s)))
        return (x.flip(-1) if flip else x), shift


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
    """uint8 [B, 3, S, S] (or [B, 10, 3, S, S]) on the device -> the float input the network
    sees: ``x / 255 + shift - mean``, the older pipeline's per-image operations in its order
    (``to_tensor``, :class:`PCALighting`, ``subtract_mean``), batched.  ``shifts``: [B, 3]
    lighting shifts (None: no lighting, evaluation)."""
    # The float ops on the contiguous NCHW tensor (long inner loops; on a channels_last one the
    # broadcast per-channel operands make the inner loop 3 long: measured 3x slower on a CPU),
    # then the layout change once.
    x = pixels.contiguous().float().div_(255.0)
    if shifts is not None:
        per_row = (-1, *([1] * (x.dim() - 4)), 3, 1, 1)  # one shift per row (each of its ten crops)
        x.add_(shifts.to(x.device, x.dtype).view(per_row))
    x.sub_(torch.tensor(mean, dtype=x.dtype).to(x.device).view(3, 1, 1))
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


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
    crops: torch.Tensor  # uint8 [k, 3, S, S]: the rows decoded on the CPU (not RGB JPEGs)
    crop_rows: torch.Tensor  # int64 [k]
    shifts: torch.Tensor  # float32 [B, 3]
    labels: torch.Tensor  # int64 [B]


def device_decodable(im: Image.Image) -> bool:
    """Whether the device decodes this file: a one-frame JPEG of three YCbCr channels (what
    nvJPEG and libjpeg-turbo both turn into RGB).  Grayscale and CMYK JPEGs, PNGs and every
    other format are decoded on the CPU."""
    return im.format == "JPEG" and im.mode == "RGB" and getattr(im, "n_frames", 1) == 1


class EncodedSamples(Dataset):
    """Indexed by ``(index, epoch)`` like the CPU path's training samples; yields
    ``("jpeg", bytes, geometry, shift, label)`` or ``("crop", uint8 crop, None, shift, label)``."""

    def __init__(self, samples, crop: CropTransform, seed: int):
        self.samples, self.crop, self.seed = samples, crop, seed

    def __len__(self) -> int:
        return len(self.samples)

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
    s = items[0][1].shape[-1] if crop == [] else crop[0][1][1].shape[-1]
    return Encoded(
        jpegs=[it[1] for _, it in jpeg],
        geometry=geometry if geometry is not None else torch.zeros((0, 6), dtype=torch.int64),
        crops=torch.stack([it[1] for _, it in crop]) if crop else torch.zeros((0, 3, s, s), dtype=torch.uint8),
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
    """uint8 [B, 3, S, S] on ``device``: the JPEGs decoded there in one batched call, the
    CPU-decoded rows copied in."""
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; decode_jpeg still works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    rows = batch.labels.shape[0]
    out = torch.empty((rows, 3, size, size), dtype=torch.uint8, device=device)
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
            out[geo[0]] = crop_decoded(img, geo[1:], size)
    return out
