"""The evaluation path training and launch/evaluate.py share, against a computation written
from scratch (numpy) on the raw logits of the same examples: top-1, top-5, per-class accuracy,
the confusion matrix, and the paper's ten-crop combination (the softmax averaged over 10 crops).

The "network" is a lookup table: example i's input holds i, its output is row i of a logit
table drawn here, so the expected figures come from the logits alone."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from distalex.training.evaluate import class_probabilities, evaluate_accuracy, evaluation_counts

CPU = SimpleNamespace(device=torch.device("cpu"), sum_over_replicas=lambda t: t)  # one replica


class Lookup(nn.Module):
    """Input [B, 1, 1, 1] holding row numbers -> those rows of ``table``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[x.flatten().long()]


class Rows:
    """The loader interface: ``eval_batches`` yields (inputs, labels); ``crops`` > 0 makes
    ten-crop-shaped inputs [B, crops, 1, 1, 1] whose crop j of example i is row i * crops + j."""

    def __init__(self, labels: torch.Tensor, crops: int = 0):
        self.labels, self.crops = labels, crops

    def eval_batches(self, batch_size):
        n = len(self.labels)
        for s in range(0, n, batch_size):
            ids = torch.arange(s, min(s + batch_size, n))
            if self.crops:
                x = (ids[:, None] * self.crops + torch.arange(self.crops)).float().view(-1, self.crops, 1, 1, 1)
            else:
                x = ids.float().view(-1, 1, 1, 1)
            yield x, self.labels[ids]


def by_hand(scores: np.ndarray, labels: np.ndarray, classes: int) -> dict:
    """top-1, top-5, per-class accuracy and confusion from per-example class scores."""
    order = np.argsort(-scores, axis=1, kind="stable")
    pred = order[:, 0]
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for t, p in zip(labels, pred, strict=True):
        confusion[t, p] += 1
    per_class = [float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else None for c in range(classes)]
    return {
        "top1": float(np.mean(pred == labels)),
        "top5": float(np.mean([t in row[:5] for t, row in zip(labels, order, strict=True)])),
        "per_class": per_class,
        "confusion": confusion,
    }


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def draw(n: int, classes: int, crops: int = 1, seed: int = 0):
    g = np.random.default_rng(seed)
    # Crops disagree strongly (scale 3): averaging logits, averaging softmax and voting then differ.
    logits = g.normal(0, 3, size=(n, crops, classes)).astype(np.float32)
    labels = g.integers(0, classes, size=n)
    labels[:classes] = np.arange(classes)  # every class present
    return logits, labels


def check(counts, expected, classes):
    n = counts.n
    assert counts.top1 / n == pytest.approx(expected["top1"], abs=0)
    assert counts.per_class() == pytest.approx(expected["per_class"], abs=1e-12)
    np.testing.assert_array_equal(counts.confusion.numpy(), expected["confusion"])
    if classes >= 5:
        assert counts.figures()["test_top5"] == pytest.approx(expected["top5"], abs=0)


@pytest.mark.parametrize(("n", "classes", "batch"), [(53, 7, 8), (40, 10, 40), (9, 3, 4)])
def test_centre_crop_figures_equal_a_computation_from_the_raw_logits(n, classes, batch):
    logits, labels = draw(n, classes)
    model = Lookup(torch.from_numpy(logits[:, 0]))
    y = torch.from_numpy(labels)
    counts = evaluation_counts(model, Rows(y), batch, CPU, contextlib.nullcontext, classes)
    expected = by_hand(logits[:, 0], labels, classes)
    check(counts, expected, classes)
    figures = evaluate_accuracy(model, Rows(y), batch, CPU, contextlib.nullcontext, classes)  # training's figures
    assert figures["test_acc"] == pytest.approx(expected["top1"], abs=0)
    assert ("test_top5" in figures) == (classes >= 5)
    if classes >= 5:
        assert figures["test_top5"] == pytest.approx(expected["top5"], abs=0)
        assert expected["top5"] > expected["top1"]  # the two figures are told apart


def test_ten_crop_averages_the_softmax_over_the_crops():
    n, classes, crops = 60, 6, 10
    logits, labels = draw(n, classes, crops, seed=1)
    model = Lookup(torch.from_numpy(logits.reshape(n * crops, classes)))
    y = torch.from_numpy(labels)
    counts = evaluation_counts(model, Rows(y, crops), 16, CPU, contextlib.nullcontext, classes)
    mean_softmax = softmax(logits).mean(axis=1)
    expected = by_hand(mean_softmax, labels, classes)
    check(counts, expected, classes)
    # The data tells the paper's rule apart from the other ways of combining crops.
    assert (mean_softmax.argmax(1) != logits.mean(axis=1).argmax(1)).any()
    assert (mean_softmax.argmax(1) != logits[:, 4].argmax(1)).any()  # the centre crop alone
    votes = np.array([np.bincount(row, minlength=classes).argmax() for row in logits.argmax(2)])
    assert (mean_softmax.argmax(1) != votes).any()
    # Prediction ranks by the same probabilities.
    x, _ = next(Rows(y, crops).eval_batches(n))
    np.testing.assert_allclose(class_probabilities(model, x).numpy(), mean_softmax, rtol=1e-5, atol=1e-7)
