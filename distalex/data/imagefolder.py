"""ImageNet-style image folders: the paper's augmentation and evaluation crops.

Layout (torchvision's ImageFolder)::

    data.root/train/<class>/*.jpg|png|...
    data.root/val/<class>/*.jpg|png|...

Training transform (Krizhevsky et al. 2012, §2 and §4.1): shorter side to
``data.resize_size`` (256), a random ``data.image_size`` crop (224), a
horizontal flip with p = 0.5, PCA lighting noise (``data.pca_sigma`` = 0.1 on
[0, 1] RGB with the published ImageNet eigenvalues/eigenvectors), then the
per-channel mean is subtracted.  Evaluation: shorter side to ``resize_size``,
the centre crop or, with ``eval.ten_crop``, the ten crops (4 corners + centre
and their mirrors) that the training loop averages the softmax over.

Batches follow the same :class:`~distalex.data.common.GlobalBatchPlan` as the
in-memory datasets.  The random
augmentation of a sample depends only on ``(seed, epoch, index)`` (one
generator per sample), never on worker scheduling, so any placement, any
number of DataLoader workers and a resume at any batch see identical tensors.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.autograd.profiler import record_function
from torch.utils.data import DataLoader, Dataset, Subset

from distalex.data.common import Batch, DataBundle, GlobalBatchPlan, ReplicaShare, SharedCheck
from distalex.data.images import UNREADABLE, open_image_file, to_mode, why_unreadable
from distalex.data.pixels import (
    CropSamples,
    CropTransform,
    EncodedSamples,
    EvalCrops,
    collate_encoded,
    decode_batch,
    draw_crop,
    finish_batch,
    gather_rows,
    my_share,
    sample_generator,
    ten_crop,
)
from distalex.errors import ConfigError, DataError, DataFailure

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# ImageNet statistics on [0, 1] RGB (the values fb.resnet.torch and torchvision use).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),  # columns are the eigenvectors
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

Sample = tuple[str, int]


# --------------------------------------------------------------------------- transforms


class PCALighting(nn.Module):
    """AlexNet's colour augmentation (§4.1): add ``eigvec @ (alpha * eigval)`` to every
    pixel, with ``alpha ~ N(0, sigma)`` drawn once per image.  ``sigma = 0`` is the identity.
    """

    def __init__(
        self,
        sigma: float = 0.1,
        eigval: Sequence[float] = IMAGENET_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC,
    ):
        super().__init__()
        self.sigma = float(sigma)
        self.register_buffer("eigval", torch.tensor(eigval, dtype=torch.float32), persistent=False)
        self.register_buffer("eigvec", torch.tensor(eigvec, dtype=torch.float32), persistent=False)

    def offset(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The RGB shift [3] of one draw."""
        alpha = torch.randn(3, generator=generator) * self.sigma
        return self.eigvec @ (alpha * self.eigval)

    def forward(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``img``: float [3, H, W]; returns a new tensor (or ``img`` itself when sigma is 0)."""
        if self.sigma == 0:
            return img
        return img + self.offset(generator).to(img.dtype).view(3, 1, 1)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


def subtract_mean(img: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN) -> torch.Tensor:
    return img - torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)


def _load_rgb(path: str, min_side: int = 0) -> Image.Image:
    """Decode as RGB.  ``min_side``: JPEGs may be decoded at a reduced DCT scale
    (PIL's draft mode, much faster for large photos) as long as both sides stay
    >= ``min_side``; the exact resize to the shorter side happens afterwards.

    Every file passed :func:`verify_images` at start-up, so a file that fails here
    changed (or is damaged past its header) while the run went on: a failure of
    the run (exit 1, its checkpoints kept), not bad input."""
    try:
        with open_image_file(path, DataFailure) as fh, Image.open(fh) as im:
            if min_side:
                im.draft("RGB", (min_side, min_side))
            return to_mode(im, "RGB")[0]  # the conversions prediction makes too (16-bit scaled, ...)
    except DataFailure as exc:  # no longer a regular file (a FIFO put there meanwhile, say)
        raise DataFailure(
            f"image {path} cannot be read during the run ({exc.reason}); it passed the start-up check, so it "
            f"changed meanwhile; the run stops, its checkpoints are kept"
        ) from None
    except UNREADABLE as exc:
        raise DataFailure(
            f"image {path} cannot be read during the run ({why_unreadable(exc)}); it passed the start-up check, so it "
            f"changed or is damaged past its header; the run stops, its checkpoints are kept"
        ) from None


def image_problem(path: str) -> str | None:
    """Why ``path`` is not an image PIL can read, from its header alone (no decoding); None if it is.
    A FIFO, a device or a directory with an image's name is refused without being read."""
    try:
        with open_image_file(path) as fh, Image.open(fh) as im:
            w, h = im.size
    except DataError as exc:
        return exc.reason
    except UNREADABLE as exc:
        return why_unreadable(exc)
    if w < 1 or h < 1:
        return f"its size is {w}x{h}"
    return None


# A progress bar for checks of at least this many files (a few seconds' work).
PROGRESS_FROM = 5000


def verify_images(samples: list[Sample], share: SharedCheck) -> None:
    """Open every image's header before anything is written (exit 2 on a bad one).

    The processes split the files (``share``) and agree, through one collective, on
    the first bad file, so all of them refuse the run with the same line.  Cost: a
    file open and a header parse per image (see docs/imagenet.md, "Folder layout")."""
    mine = range(share.rank, len(samples), share.world)
    first_bad = len(samples)
    bar = None
    if share.progress and len(mine) >= PROGRESS_FROM:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="checking images", unit="img", dynamic_ncols=True)
    try:
        for i in mine:
            if image_problem(samples[i][0]) is not None:
                first_bad = i
                break
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    first_bad = share.min_over_ranks(first_bad)
    if first_bad < len(samples):
        path = samples[first_bad][0]
        why = image_problem(path) or "it could not be read on another process"
        raise DataError(f"image {path} cannot be read ({why}); fix or remove it")


class TrainTransform:
    """PIL image + generator -> float [3, S, S] (resize, random crop, flip, lighting, mean), all
    on the CPU: ``data.pipeline=float``, the pipeline before the uint8 one (kept for comparison)."""

    def __init__(self, resize_size: int, image_size: int, pca_sigma: float):
        self.resize_size, self.image_size = resize_size, image_size
        self.lighting = PCALighting(pca_sigma)

    def __call__(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        img = TF.resize(img, self.resize_size)  # shorter side -> resize_size
        s = self.image_size
        top, left, flip, shift = draw_crop(g, *img.size, s, self.lighting)
        img = img.crop((left, top, left + s, top + s))
        x = TF.to_tensor(img)
        if flip:
            x = x.flip(-1)
        if self.lighting.sigma:
            x = x + shift.to(x.dtype).view(3, 1, 1)
        return subtract_mean(x)


class EvalTransform:
    """PIL image -> float [3, S, S] (centre crop) or [10, 3, S, S] (ten crops)."""

    def __init__(self, resize_size: int, image_size: int, ten_crop: bool):
        self.resize_size, self.image_size, self.ten_crop = resize_size, image_size, ten_crop

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = TF.to_tensor(TF.resize(img, self.resize_size))
        if self.ten_crop:
            return subtract_mean(ten_crop(x, self.image_size))
        return subtract_mean(TF.center_crop(x, [self.image_size, self.image_size]))


# --------------------------------------------------------------------------- folders


def _class_images(class_dir: Path) -> tuple[list[str], list[str]]:
    """Image files under one class folder (sorted, depth first) and the directory links in it.

    Directory links inside a class folder are not followed: one that leads out of it
    (``loop -> ..``, or to another class) would read other classes' images under this
    label, or loop for ever; one that stays inside only repeats images the walk finds
    anyway.  (The class folder itself may be a link.)"""
    found: list[str] = []
    links: list[str] = []

    def unlistable(exc: OSError):
        raise DataError(f"ImageFolder folder {exc.filename} cannot be listed ({exc.strerror or exc})")

    for root, dirs, files in os.walk(class_dir, onerror=unlistable):
        dirs.sort()
        links += [os.path.join(root, d) for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return found, links


def scan_split(directory: Path, warnings: list[str] | None = None) -> tuple[tuple[str, ...], list[Sample]]:
    """Class names (sorted sub-folders) and (path, label) samples, in a fixed order.

    A class folder without images stays a class (its label is its place among the
    folder names, as in torchvision, so labels never shift) and earns a warning in
    ``warnings``, as do directory links that were not followed."""
    if not directory.is_dir():
        raise DataError(f"ImageFolder split {directory} does not exist (expected {directory}/<class>/<image files>)")
    classes = tuple(sorted(e.name for e in os.scandir(directory) if e.is_dir()))
    if not classes:
        raise DataError(f"ImageFolder split {directory} has no class sub-folders")
    real_split = os.path.realpath(directory)
    for name in classes:
        real = os.path.realpath(directory / name)
        if os.path.commonpath([real, real_split]) == real:
            raise DataError(
                f"ImageFolder class folder {directory / name} is a link to {real}, which holds the split "
                f"folder itself: every image would be read under one label"
            )
    samples: list[Sample] = []
    empty: list[str] = []
    skipped: list[str] = []
    for label, name in enumerate(classes):
        found, links = _class_images(directory / name)
        samples += [(p, label) for p in found]
        skipped += links
        if not found:
            empty.append(name)
    if not samples:
        raise DataError(f"ImageFolder split {directory} holds no images (extensions {', '.join(IMG_EXTENSIONS)})")
    notes = warnings if warnings is not None else []
    if empty:
        listed = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        notes.append(
            f"ImageFolder {directory}: {len(empty)} class folder(s) hold no images ({listed}); "
            f"kept as classes so that labels follow the folder names"
        )
    if skipped:
        notes.append(
            f"ImageFolder {directory}: {len(skipped)} directory link(s) inside class folders were not "
            f"followed (they would read other folders' images under the class's label; first: {skipped[0]})"
        )
    return classes, samples


def limit_samples(samples: list[Sample], n: int | None) -> list[Sample]:
    """``n`` evenly spaced samples (ImageFolder order is by class, so the first n
    would all be one class); all of them when ``n`` is unset or large."""
    if n is None or n >= len(samples):
        return samples
    return [samples[i * len(samples) // n] for i in range(n)]


class TrainSamples(Dataset):
    """The float pipeline's training samples (``data.pipeline=float``): (float image, label),
    indexed by ``(index, epoch)`` so the augmentation is reproducible.  The uint8 pipeline's
    are :class:`~distalex.data.pixels.CropSamples`."""

    def __init__(self, samples: list[Sample], transform: TrainTransform, seed: int):
        self.samples, self.transform, self.seed = samples, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        path, label = self.samples[index]
        img = _load_rgb(path, self.transform.resize_size)
        return self.transform(img, sample_generator(self.seed, epoch, index)), label


class EvalSamples(Dataset):
    def __init__(self, samples: list[Sample], transform: EvalTransform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(_load_rgb(path, self.transform.resize_size)), label


class EpochBatchSampler:
    """This replica's slice of every global batch of one epoch, from ``start_batch``; with a
    ``share``, this process's share of that slice (:func:`~distalex.data.pixels.my_share`).

    Mutable (``epoch``/``start_batch``) so one DataLoader with persistent
    workers serves every epoch; each index carries its epoch to the worker.
    """

    def __init__(self, plan: GlobalBatchPlan, share: ReplicaShare | None = None):
        self.plan, self.share = plan, share
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return max(0, self.plan.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for index in self.plan.epoch_indices(epoch, self.start_batch):
            batch = [(i, epoch) for i in index.tolist()]
            yield my_share(batch, self.share) if self.share else batch


def eval_batches_of(plan: GlobalBatchPlan, batch_size: int) -> list[list[int]]:
    """This replica's evaluation rows in batches of ``batch_size`` (every example once over all replicas)."""
    share = plan.eval_range()
    return [list(range(a, min(a + batch_size, share.stop))) for a in range(share.start, share.stop, batch_size)]


def _one_line(exc: DataFailure) -> DataFailure:
    """An error re-raised from a DataLoader worker carries the worker's traceback; keep its last line."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    tail = lines[-1] if lines else str(exc)
    prefix = f"{type(exc).__name__}: "
    return type(exc)(tail[tail.find(prefix) + len(prefix) :] if prefix in tail else tail)


class ImageFolderLoader:
    """DeviceLoader's interface over image files: ``batches_per_epoch``,
    ``epoch(epoch, start_batch)`` (augmented training batches) and
    ``eval_batches(batch_size)`` (evaluation crops, every example once).

    ``data.pipeline=uint8`` (the default): the workers yield uint8 crops (decoded on the CPU,
    or with ``data.decode=gpu`` file bytes decoded on the device), the float work runs on the
    device (:mod:`distalex.data.pixels`); ``share``: how this replica's processes split the
    decoding.  ``data.pipeline=float``: the older pipeline, float on the CPU, every process
    decoding its replica's whole batch."""

    def __init__(
        self,
        samples: list[Sample],
        cfg,
        plan: GlobalBatchPlan,
        device: torch.device,
        share: ReplicaShare | None = None,
    ):
        d, t = cfg.data, cfg.train
        self.samples, self.plan = samples, plan
        self.device = torch.device(device)
        self.num_workers = d.num_workers
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.pin = self.device.type == "cuda"
        self.legacy = d.pipeline == "float"
        self.decode = decode_on(d.decode, self.device)
        self.share = share if share is not None and share.members > 1 and not self.legacy else None
        self.image_size = d.image_size
        self.train_transform = TrainTransform(d.resize_size, d.image_size, d.pca_sigma)
        self.crop_transform = CropTransform(d.resize_size, d.image_size, self.train_transform.lighting, d.resampler)
        self.eval_transform = EvalTransform(d.resize_size, d.image_size, cfg.eval.ten_crop)
        self.eval_crops = EvalCrops(d.resize_size, d.image_size, cfg.eval.ten_crop)
        self._sampler: EpochBatchSampler | None = None
        self._train_loader: DataLoader | None = None
        self._eval_loaders = {}

    def _loader_kwargs(self) -> dict:
        # A private generator: without one, every DataLoader iterator draws its base
        # seed from the global torch RNG, which would shift the dropout masks by
        # where in the run the loaders happened to be (re)started - no exact resume.
        # (Augmentation never uses it: see sample_generator.)
        return dict(
            num_workers=self.num_workers,
            pin_memory=self.pin,  # uint8 batches through pinned memory to the GPU
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.plan.seed),
        )

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        x = x.to(self.device, non_blocking=self.pin)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=self.pin)

    def _finish(self, raw, rows: int, shared: bool) -> Batch:
        """A worker's batch -> the replica's whole float batch on the device; ``shared``: the
        batch is this process's share, to be gathered with the other members'.  Training crops
        travel height-width-channel (as decoded, [B, S, S, 3]), evaluation crops channel-first
        (the ten crops of a row stacked)."""
        if self.legacy:
            return self._to_device(*raw)
        if isinstance(raw, tuple) and hasattr(raw, "jpegs"):  # data.decode=gpu
            pixels, shifts, labels = decode_batch(raw, self.image_size, self.device), raw.shifts, raw.labels
        elif len(raw) == 3:  # training crops
            pixels, shifts, labels = raw
        else:  # evaluation crops: no lighting
            (pixels, labels), shifts = raw, None
        training = shifts is not None
        fields = [t.to(self.device, non_blocking=self.pin) for t in (pixels, shifts, labels) if t is not None]
        if shared:
            fields = gather_rows(fields, rows, self.share)
        pixels, labels = fields[0], fields[-1]
        shifts = fields[1] if training else None
        if training:
            pixels = pixels.permute(0, 3, 1, 2)  # NCHW, channels-last in memory
        with record_function("data:finish"):  # profile label (distalex/telemetry/profiling.py)
            return finish_batch(pixels, shifts, IMAGENET_MEAN, self.memory_format), labels

    def _iterate(self, loader: DataLoader, rows: Iterable[int], shared: bool = False) -> Iterator[Batch]:
        """The loader's batches finished on the device; ``rows``: each batch's rows in the replica;
        ``shared``: each batch is this process's share (gathered with the replica's others)."""
        batches = iter(loader)
        for n in rows:
            with record_function("data:load"):  # profile label (distalex/telemetry/profiling.py)
                try:
                    raw = next(batches)
                except StopIteration:
                    return
                except DataFailure as exc:
                    raise _one_line(exc) from None
                batch = self._finish(raw, n, shared)
            yield batch

    def _train_dataset(self) -> tuple[Dataset, Callable | None]:
        if self.legacy:
            return TrainSamples(self.samples, self.train_transform, self.plan.seed), None
        if self.decode == "gpu":
            return EncodedSamples(self.samples, self.crop_transform, self.plan.seed), collate_encoded
        return CropSamples(self.samples, self.crop_transform, self.plan.seed), None

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        if self.share is not None and self.share.train_pixels == "first" and self.share.member > 0:
            yield from self._labels_only(epoch, start_batch)
            return
        shared = self.share is not None and self.share.train_pixels == "all"
        if self._train_loader is None:
            self._sampler = EpochBatchSampler(self.plan, self.share if shared else None)
            dataset, collate = self._train_dataset()
            kwargs = self._loader_kwargs() | ({"collate_fn": collate} if collate else {})
            self._train_loader = DataLoader(dataset, batch_sampler=self._sampler, **kwargs)
        # The sampler is read when the DataLoader's iterator is (re)started, i.e. at
        # the first next() below, so set it inside the generator.
        self._sampler.epoch, self._sampler.start_batch = epoch, start_batch
        yield from self._iterate(self._train_loader, itertools.repeat(self.plan.local_batch), shared)

    def _labels_only(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        """A pipeline stage after the first: the labels of every batch (from the file list, no
        file opened) and an empty image tensor in place of the pixels it never reads."""
        for index in self.plan.epoch_indices(epoch, start_batch):
            labels = torch.tensor([self.samples[i][1] for i in index.tolist()], dtype=torch.int64)
            yield torch.empty((len(labels), 0), device=self.device), labels.to(self.device)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every example once over all replicas; this replica's contiguous share (decoded
        shared by its processes, which all evaluate it)."""
        batches = eval_batches_of(self.plan, batch_size)
        loader = self._eval_loaders.get(batch_size)
        if loader is None:
            if self.legacy:
                share = Subset(EvalSamples(self.samples, self.eval_transform), self.plan.eval_range())
                loader = DataLoader(share, batch_size=batch_size, shuffle=False, **self._loader_kwargs())
            else:
                mine = [my_share(b, self.share) if self.share else b for b in batches]
                dataset = EvalSamples(self.samples, self.eval_crops)
                loader = DataLoader(dataset, batch_sampler=mine, **self._loader_kwargs())
            self._eval_loaders[batch_size] = loader
        yield from self._iterate(loader, [len(b) for b in batches], self.share is not None)


def decode_on(decode: str, device: torch.device) -> str:
    """``data.decode`` resolved for this process's device: 'cpu' or 'gpu' (auto: gpu on CUDA)."""
    if decode == "gpu" and device.type != "cuda":
        raise ConfigError(
            f"config key 'data.decode': gpu decodes JPEGs on a CUDA device, but this run trains on "
            f"{device.type}; use data.decode=cpu or auto"
        )
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return decode


def build_imagefolder(
    cfg,
    replica: int,
    replicas: int,
    device: torch.device,
    check: SharedCheck | None = None,
    share: ReplicaShare | None = None,
) -> DataBundle:
    d, t = cfg.data, cfg.train
    root = _checked_root(cfg)
    decode_on(d.decode, torch.device(device))  # a GPU decode without a GPU: refused before the files are read
    warnings: list[str] = []
    train_classes, train_samples = scan_split(root / "train", warnings)
    val_classes, val_samples = scan_split(root / "val", warnings)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"ImageFolder {root}: the class folders of train/ and val/ differ "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )
    train_samples = limit_samples(train_samples, d.train_limit)
    val_samples = limit_samples(val_samples, d.test_limit)
    verify_images(train_samples + val_samples, check or SharedCheck())

    def loader(samples: list[Sample]) -> ImageFolderLoader:
        plan = GlobalBatchPlan(len(samples), t.batch_size, replica, replicas, t.seed)
        return ImageFolderLoader(samples, cfg, plan, device, share)

    return DataBundle(loader(train_samples), loader(val_samples), len(train_classes), train_classes, warnings)


def build_imagefolder_val(
    cfg,
    replica: int,
    replicas: int,
    device: torch.device,
    check: SharedCheck | None = None,
    share: ReplicaShare | None = None,
) -> tuple[ImageFolderLoader, tuple[str, ...], list[str]]:
    """The val/ split alone (what evaluating a trained network reads): its loader, its
    classes and the warnings; ``train/`` is neither needed nor read."""
    d, t = cfg.data, cfg.train
    root = _checked_root(cfg)
    warnings: list[str] = []
    classes, samples = scan_split(root / "val", warnings)
    samples = limit_samples(samples, d.test_limit)
    verify_images(samples, check or SharedCheck())
    plan = GlobalBatchPlan(len(samples), t.batch_size, replica, replicas, t.seed)
    return ImageFolderLoader(samples, cfg, plan, device, share), classes, warnings


def _checked_root(cfg) -> Path:
    d, m = cfg.data, cfg.model
    if d.root is None:
        raise DataError(
            "data.name=imagefolder needs data.root: a folder holding train/ and val/ "
            "in torchvision's ImageFolder layout"
        )
    root = Path(d.root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"ImageFolder root {root} does not exist (data.root; expected "
            f"{root}/train/<class>/... and {root}/val/<class>/...)"
        )
    if m.in_channels != 3:
        raise DataError(f"ImageFolder images are loaded as RGB: model.in_channels must be 3, got {m.in_channels}")
    if d.resize_size < d.image_size:
        raise DataError(f"data.resize_size={d.resize_size} is smaller than the crop data.image_size={d.image_size}")
    return root
