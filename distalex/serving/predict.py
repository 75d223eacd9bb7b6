"""``launch/predict.py``: the top-k classes of images, one JSON line per image.

Each image is decoded, converted to what the network expects and preprocessed
exactly as evaluation preprocesses its data (:mod:`distalex.data.images`), then
ranked by :func:`distalex.training.evaluate.class_probabilities` (the softmax,
or with ten crops the softmax averaged over them).  Every image is decoded
before the first line is printed, so a bad one refuses the command (exit 2)
with nothing printed or written.  A folder whose sub-folders are class names
of the checkpoint is a labelled folder: each line then carries the true class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distalex.data.imagefolder import IMG_EXTENSIONS
from distalex.data.images import eval_tensor, mode_for, open_image
from distalex.errors import ConfigError, DataError, OutputError
from distalex.runtime.io import not_a_regular_file
from distalex.serving.loaded import Loaded, reference_model
from distalex.telemetry.plots import plot_predictions
from distalex.training.evaluate import class_probabilities

BATCH = 32  # images per forward pass
GRID_MAX = 60  # images drawn in the grid at most (a grid of thousands is unreadable)
THUMB = 96  # pixels of the longer side of an image in the grid
EXTENSIONS = (*IMG_EXTENSIONS, ".gif")  # what a folder is searched for (an animation gives its first frame)


@dataclass
class Item:
    path: Path
    label: int | None  # the true class of an image in a labelled folder


def collect(paths, classes: tuple[str, ...]) -> list[Item]:
    """The images named on the command line: files as given, folders' image files (by
    extension, sorted), a labelled folder's images with their true classes."""
    items: list[Item] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = _folder(path, classes)
            if not found:
                raise DataError(f"folder {path} holds no images (extensions {', '.join(EXTENSIONS)})")
            items += found
        elif path.exists():
            items.append(Item(path, None))
        else:
            raise DataError(f"image {path} does not exist")
    return items


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(EXTENSIONS)


def _folder(path: Path, classes: tuple[str, ...]) -> list[Item]:
    subdirs = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if subdirs and set(subdirs) <= set(classes):  # labelled: <folder>/<class name>/<images>
        return [
            Item(f, classes.index(name)) for name in subdirs for f in sorted((path / name).rglob("*")) if _is_image(f)
        ]
    return [Item(f, None) for f in sorted(path.iterdir()) if _is_image(f)]


def check_output_file(path: Path, overwrite: bool, what: str) -> None:
    """An output file a command will write: it must not exist (unless ``overwrite``) and its
    folder must exist; refused before anything runs."""
    kind = not_a_regular_file(path)
    if kind is not None:  # a link, a FIFO, a device, a directory: never written through or replaced
        raise OutputError(f"{what} '{path}' is {kind}; distalex writes its outputs as regular files only")
    if path.exists() and not overwrite:
        raise OutputError(f"{what} '{path}' exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"{what} '{path}': folder {path.parent} does not exist")


def predict(
    loaded: Loaded,
    paths,
    top_k: int,
    ten_crop: bool,
    grid: Path | None,
    overwrite: bool,
    emit: Callable[[str], None],
    notify: Callable[[str], None],
) -> int:
    """Print one JSON line per image through ``emit`` (notices through ``notify``); write the
    grid if asked.  Returns the number of images."""
    cfg, spec = loaded.cfg, loaded.spec
    data = cfg.data
    if ten_crop and data.name != "imagefolder":
        raise ConfigError(f"--ten-crop: ten crops are taken from ImageFolder images; data.name={data.name}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    k = min(top_k, spec.num_classes)
    mode = mode_for(spec.in_channels)
    min_side = data.resize_size if data.name == "imagefolder" else 0  # ImageFolder's JPEG draft decoding
    items = collect(paths, loaded.classes)
    if grid is not None:
        check_output_file(grid, overwrite, "--grid")
    notes = {}
    for item in items:  # every image decodes, or nothing is printed
        notes[item.path] = open_image(item.path, mode, min_side)[1]
    for notice in loaded.notices:
        notify(f"distalex: notice: {notice}")
    for item in items:
        for note in notes[item.path]:
            notify(f"distalex: notice: {item.path}: {note}")

    model = reference_model(loaded).to(_device())
    shown, titles, correct = [], [], []
    with torch.inference_mode():
        for start in range(0, len(items), BATCH):
            batch = items[start : start + BATCH]
            images = [open_image(it.path, mode, min_side)[0] for it in batch]
            x = torch.stack([eval_tensor(im, data, ten_crop) for im in images]).to(_device())
            probs = class_probabilities(model, x).cpu()
            best = probs.topk(k, dim=1)
            for i, item in enumerate(batch):
                line = _line(item, best.indices[i].tolist(), best.values[i].tolist(), loaded.classes)
                emit(json.dumps(line))
                if grid is not None and len(shown) < GRID_MAX:
                    shown.append(_thumbnail(images[i]))
                    guess = line["top"][0]["class"]
                    titles.append(guess if item.label is None else f"{guess}\n(true: {line['true']})")
                    correct.append(None if item.label is None else item.label == best.indices[i, 0].item())
    if grid is not None:
        if len(items) > GRID_MAX:
            notify(f"distalex: notice: --grid shows the first {GRID_MAX} of {len(items)} images")
        plot_predictions(shown, titles, grid, correct=correct)
    return len(items)


def _line(item: Item, indices: list[int], probs: list[float], classes: tuple[str, ...]) -> dict:
    line = {
        "image": str(item.path),
        "top": [{"class": classes[i], "index": i, "probability": p} for i, p in zip(indices, probs, strict=True)],
    }
    if item.label is not None:
        line["true"] = classes[item.label]
    return line


def _thumbnail(im) -> np.ndarray:
    thumb = im.copy()
    thumb.thumbnail((THUMB, THUMB))
    return np.asarray(thumb)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
