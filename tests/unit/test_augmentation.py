"""The paper's training augmentation (§4.1), measured on what the ImageFolder loader yields.

The transforms' parts have unit tests of their own (tests/unit/test_imagefolder.py);
these drive the whole training path -- ``ImageFolderLoader.epoch`` over real image
files, one generator per (seed, epoch, index) -- and test the behaviour
statistically: each crop is a window of the resized image at a uniformly drawn
position, mirrored with probability 1/2, and the PCA lighting adds one
colour shift per image whose coefficients are N(0, sigma) along the eigenvectors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from distalex.config import load_config
from distalex.data.common import GlobalBatchPlan
from distalex.data.imagefolder import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN, ImageFolderLoader

CPU = torch.device("cpu")
W, H = 48, 40  # the image (landscape), already at the resize size: its shorter side is RESIZE
RESIZE, S = 40, 32  # crops of 32 x 32: left in [0, 16], top in [0, 8]
N = 2000  # draws (every one an example of the loader, in batches of 250)
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def loader_over(path, pca_sigma: float, seed: int = 0) -> ImageFolderLoader:
    cfg = load_config(
        None,
        [
            "data.name=imagefolder",
            f"data.image_size={S}",
            f"data.resize_size={RESIZE}",
            f"data.pca_sigma={pca_sigma}",
            "data.num_workers=0",
            "model.in_channels=3",
            "train.channels_last=false",
        ],
    )
    samples = [(str(path), 0)] * N  # one file, N examples: each gets its own draw
    return ImageFolderLoader(samples, cfg, GlobalBatchPlan(N, 250, seed=seed), CPU)


def all_images(loader: ImageFolderLoader, epoch: int = 0) -> torch.Tensor:
    return torch.cat([x for x, _ in loader.epoch(epoch)])


def chi_square_p(counts: np.ndarray) -> float:
    """p-value of Pearson's chi-square test of ``counts`` against the uniform distribution."""
    expected = counts.sum() / len(counts)
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)).item()


@pytest.fixture(scope="module")
def coordinates(tmp_path_factory):
    """A lossless image whose red level encodes the column (5x) and green the row (6x)."""
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[..., 0] = 5 * np.arange(W)[None, :]
    pixels[..., 1] = 6 * np.arange(H)[:, None]
    pixels[..., 2] = 128
    path = tmp_path_factory.mktemp("aug") / "coordinates.png"
    Image.fromarray(pixels).save(path)
    return path, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


def test_crops_are_uniform_windows_mirrored_half_the_time(coordinates):
    path, image = coordinates
    x = all_images(loader_over(path, pca_sigma=0.0))
    assert x.shape == (N, 3, S, S)
    levels = torch.round((x + MEAN) * 255)  # back to the file's levels (the mean is subtracted)
    first, last = levels[:, 0, 0, 0] / 5, levels[:, 0, 0, -1] / 5  # column of the crop's left/right edge
    flipped = first > last
    left = torch.where(flipped, last, first).long()
    top = (levels[:, 1, 0, 0] / 6).long()
    for i in range(N):  # each output is exactly the window at (top, left), mirrored or not
        window = image[:, top[i] : top[i] + S, left[i] : left[i] + S]
        want = (window.flip(-1) if flipped[i] else window) - MEAN
        torch.testing.assert_close(x[i], want, rtol=0, atol=1e-6)

    # flips: Binomial(N, 1/2); 4.5 standard deviations either side (p < 1e-5)
    k = int(flipped.sum())
    assert abs(k - N / 2) <= 4.5 * math.sqrt(N / 4), f"{k} of {N} crops mirrored"
    # positions: every one of the 17 x 9 reachable, each coordinate uniform (chi-square, p > 1e-4)
    lefts = np.bincount(left.numpy(), minlength=W - S + 1)
    tops = np.bincount(top.numpy(), minlength=H - S + 1)
    assert len(lefts) == W - S + 1 and len(tops) == H - S + 1, "a crop outside the image"
    assert lefts.min() > 0 and tops.min() > 0, (lefts, tops)
    assert chi_square_p(lefts) > 1e-4, lefts
    assert chi_square_p(tops) > 1e-4, tops
    # and the flip is independent of the position: the mirrored crops' mean left is the others'
    spread = (W - S) / math.sqrt(12)  # std of a uniform position
    diff = left[flipped].double().mean() - left[~flipped].double().mean()
    assert abs(diff) <= 4.5 * spread * math.sqrt(1 / k + 1 / (N - k))


def test_pca_lighting_adds_one_shift_per_image_along_the_eigenvectors(tmp_path):
    """A grey image: every output pixel is the same colour, shifted from the image's by
    eigvec @ (alpha * eigval) with alpha ~ N(0, sigma^2 I) drawn per image."""
    sigma = 0.25  # not the default 0.1, so a sigma ignored for the default is seen
    colour = (120, 130, 140)
    path = tmp_path / "grey.png"
    Image.new("RGB", (W, H), colour).save(path)
    x = all_images(loader_over(path, pca_sigma=sigma))
    base = torch.tensor(colour).view(3, 1, 1) / 255 - MEAN
    shift = x - base  # [N, 3, S, S]
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)  # one per image
    shift = shift[:, :, 0, 0].double()
    vec, val = torch.tensor(IMAGENET_EIGVEC, dtype=torch.float64), torch.tensor(IMAGENET_EIGVAL, dtype=torch.float64)
    alpha = torch.linalg.solve(vec, shift.T).T / val  # the draws, recovered: [N, 3]
    # mean 0 (4.5 standard errors), std sigma (the sample std's relative error is ~1/sqrt(2N) = 1.6%),
    # and the three coefficients uncorrelated (|r| ~ 1/sqrt(N) = 0.022)
    assert (alpha.mean(0).abs() <= 4.5 * sigma / math.sqrt(N)).all(), alpha.mean(0)
    torch.testing.assert_close(alpha.std(0), torch.full((3,), sigma, dtype=torch.float64), rtol=0.08, atol=0)
    corr = torch.corrcoef(alpha.T)
    assert (corr - torch.eye(3, dtype=torch.float64)).abs().max() <= 4.5 / math.sqrt(N), corr
