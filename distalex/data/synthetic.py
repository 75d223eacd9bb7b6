"""A deterministic, learnable synthetic dataset (no files needed)."""

from __future__ import annotations

import torch

from distalex.data.memory import InMemoryDataset


def make_synthetic(n: int, num_classes: int, channels: int, side: int, seed: int) -> InMemoryDataset:
    """A fixed random template per class plus noise.

    The templates depend only on (num_classes, channels, side), so train and
    test splits made with different seeds share them.
    """
    templates = torch.rand(num_classes, channels, side, side, generator=torch.Generator().manual_seed(1234)) * 200
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.randn(n, channels, side, side, generator=g) * 40
    images = (templates[labels] + noise).clamp_(0, 255).to(torch.uint8)
    return InMemoryDataset(images, labels, tuple(f"class{i}" for i in range(num_classes)))
