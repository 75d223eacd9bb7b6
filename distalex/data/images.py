"""One image file to the tensor the network sees, exactly as evaluation makes it.

:func:`open_image` decodes a file in full (so a truncated one is found before any
result is printed) and converts it to the mode the network expects: 8-bit
grayscale for one input channel, RGB for three.  Conversions PIL would do
silently, or wrongly, are explicit and each earns a one-line note: 16-bit and
32-bit pixels are scaled (PIL's own conversion clips them at 255), CMYK and
palette images become RGB, an alpha channel is dropped, an animation gives its
first frame, RGB becomes grayscale (ITU-R 601-2 luma, PIL's) and back.

:func:`eval_tensor` is the evaluation preprocessing of the dataset the network
was trained on: ImageFolder's resize / centre crop or ten crops / mean
(:class:`~distalex.data.imagefolder.EvalTransform`, the transform the
evaluation loader runs), or for the in-memory sets (Fashion-MNIST, synthetic)
the uint8 image resized on the device as :class:`~distalex.data.memory.DeviceLoader`
resizes it.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import torch
from PIL import Image

from distalex.data.memory import resize_batch
from distalex.errors import DataError, DistalexError
from distalex.runtime.io import open_for_reading

# What PIL raises for a file it cannot open or decode (SyntaxError: some of its parsers).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per pixel


def image_max_bytes() -> int | None:
    """The largest file an image PIL decodes can be: PIL refuses more than twice its pixel
    limit (a decompression bomb), and the widest uncompressed pixel (16-bit RGBA) is 8 bytes;
    1 MiB more for headers and metadata.  None when PIL's limit is switched off."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit) * 8 + (1 << 20)


def open_image_file(path, error: type[DistalexError] = DataError):
    """The image file at ``path`` opened for PIL (a binary file object; PIL gets no path): a
    FIFO, a device or a directory is refused at once with one ``error`` line naming it."""
    return open_for_reading(path, what="image", max_bytes=image_max_bytes(), error=error)


def why_unreadable(exc: BaseException) -> str:
    """PIL's reason on one line, the file it names by its path (PIL read a file object)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return re.sub(r"<_io\.BufferedReader name=(.*?)>", r"\1", text)


def mode_for(channels: int) -> str:
    """The PIL mode of a network's input: 'L' for one channel, 'RGB' for three."""
    if channels not in (1, 3):
        raise DataError(f"images can be fed to networks of 1 or 3 input channels, this one has {channels}")
    return "L" if channels == 1 else "RGB"


def _eight_bit(im: Image.Image) -> Image.Image:
    """A 16/32-bit or float single-channel image as 8-bit grayscale, scaled, not clipped."""
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":  # floats: [0, 1] when they fit it, else their own range
        lo, hi = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (float(a.min()), float(a.max()))
    else:
        lo, hi = 0.0, 65535.0 if a.max() <= 65535 else float(a.max())
    a = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255)
    return Image.fromarray(a.astype(np.uint8), mode="L")


def to_mode(im: Image.Image, mode: str) -> tuple[Image.Image, list[str]]:
    """``im`` converted to ``mode`` ('L' or 'RGB'), and a note for every conversion a user
    should know of (an empty list for an image that already is what the network expects)."""
    notes = []
    im.load()  # the pixels outlive the file (the caller closes it), also when no conversion copies them
    if getattr(im, "n_frames", 1) > 1:
        notes.append(f"animated ({im.n_frames} frames): the first frame is used")
    if im.mode in _WIDE:
        notes.append(f"{'16' if im.mode.startswith('I;16') else '32'}-bit pixels ({im.mode}) scaled to 8 bits")
        im = _eight_bit(im)
    elif im.mode in ("P", "PA"):
        notes.append("palette image converted to RGB")
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    elif im.mode == "CMYK":
        notes.append("CMYK converted to RGB")
        im = im.convert("RGB")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        notes.append("alpha channel dropped")
        im = im.convert("RGB" if im.mode.startswith("RGB") else "L")
    if im.mode not in ("L", "RGB"):
        notes.append(f"mode {im.mode} converted to {mode}")
        im = im.convert("RGB")
    if im.mode != mode:
        notes.append(
            "grayscale copied to RGB, which the network expects"
            if mode == "RGB"
            else "RGB converted to grayscale, which the network expects"
        )
        im = im.convert(mode)
    return im, notes


def open_image(path, mode: str, min_side: int = 0) -> tuple[Image.Image, list[str]]:
    """The image at ``path`` decoded in full and converted to ``mode``, with its notes.

    ``min_side``: JPEGs may be decoded at a reduced DCT scale (PIL's draft mode) as long
    as both sides stay >= ``min_side`` -- what ImageFolder's loader does, so a prediction
    sees the very pixels evaluation sees.  An unreadable file (empty, not an image,
    truncated, a decompression bomb): one-line :class:`DataError`."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; a bomb is refused either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image_file(path) as fh, Image.open(fh) as im:
                if min_side:
                    im.draft("RGB", (min_side, min_side))
                im.load()
                return to_mode(im, mode)
    except (*UNREADABLE, Image.DecompressionBombWarning) as exc:
        why = why_unreadable(exc)
        if isinstance(exc, OSError) and exc.strerror and getattr(exc, "filename", None):
            why = exc.strerror
        raise DataError(f"image {path} cannot be read ({why})") from None


def eval_tensor(im: Image.Image, data, ten_crop: bool) -> torch.Tensor:
    """The evaluation input of one converted image: [C, S, S], or [10, C, S, S] with
    ``ten_crop`` (ImageFolder only).  ``data``: the config's data section."""
    if data.name == "imagefolder":
        from distalex.data.imagefolder import EvalTransform

        return EvalTransform(data.resize_size, data.image_size, ten_crop)(im)
    pixels = torch.from_numpy(np.array(im, dtype=np.uint8))
    pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    return resize_batch(pixels[None], data.image_size)[0]
