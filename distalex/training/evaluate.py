"""The one evaluation path: training's test figures and ``launch/evaluate.py`` both run it.

:func:`evaluation_counts` visits this replica's share of the evaluation set and
sums, exactly over replicas, a confusion matrix and the top-5 hits; every figure
(top-1, top-5, per-class accuracy) is read off those counts, so the figures a
run reports and the ones the evaluate command writes cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def class_scores(model, x: torch.Tensor) -> torch.Tensor:
    """What the classes are ranked by: the logits of a batch [B, C, H, W], or for
    ten-crop batches [B, 10, C, H, W] the softmax averaged over the crops (paper §4.1:
    "averaging the predictions made by the network's softmax layer on the ten patches")."""
    if x.dim() == 5:
        b, crops = x.shape[:2]
        return F.softmax(model(x.flatten(0, 1)).float(), dim=1).view(b, crops, -1).mean(1)
    return model(x).float()


def class_probabilities(model, x: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities of a batch, ranked exactly as :func:`class_scores` ranks them."""
    scores = class_scores(model, x)
    return scores if x.dim() == 5 else F.softmax(scores, dim=1)


@dataclass
class EvalCounts:
    """Exact counts over the whole evaluation set (float64 holds integers exactly to 2**53)."""

    confusion: torch.Tensor  # [C, C]: row = true class, column = predicted (top-1) class
    top5: int  # examples whose true class is among the 5 best scores (all of them with < 5 classes)

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def top1(self) -> int:
        return int(self.confusion.diagonal().sum())

    def figures(self) -> dict:
        """The figures training reports: ``test_acc`` and, with >= 5 classes, ``test_top5``."""
        n = max(self.n, 1)
        out = {"test_acc": self.top1 / n}
        if self.confusion.shape[0] >= 5:
            out["test_top5"] = self.top5 / n
        return out

    def per_class(self) -> list[float | None]:
        """Accuracy of each true class (None for a class without examples)."""
        rows = self.confusion.sum(1)
        return [
            None if int(r) == 0 else float(d) / float(r) for d, r in zip(self.confusion.diagonal(), rows, strict=True)
        ]


@torch.inference_mode()
def evaluation_counts(model, loader, batch_size: int, placement, autocast, num_classes: int) -> EvalCounts:
    """Confusion matrix and top-5 hits over the whole evaluation set: each replica
    evaluates its share (``loader.eval_batches``), the counts are summed over replicas."""
    was_training = model.training
    model.eval()
    c = num_classes
    counts = torch.zeros(c * c + 1, dtype=torch.float64, device=placement.device)  # confusion, then top-5
    k = min(5, c)
    for x, y in loader.eval_batches(batch_size):
        with autocast():
            scores = class_scores(model, x)
        topk = scores.topk(k, dim=1).indices
        counts[: c * c] += torch.bincount(y * c + topk[:, 0], minlength=c * c).to(counts.dtype)
        counts[c * c] += (topk == y[:, None]).any(1).sum()
    model.train(was_training)
    counts = placement.sum_over_replicas(counts).cpu()
    return EvalCounts(confusion=counts[: c * c].view(c, c).long(), top5=int(counts[c * c]))


def evaluate_accuracy(model, loader, batch_size: int, placement, autocast, num_classes: int) -> dict:
    """Top-1 (and, with >= 5 classes, top-5) accuracy over the whole evaluation set."""
    return evaluation_counts(model, loader, batch_size, placement, autocast, num_classes).figures()
