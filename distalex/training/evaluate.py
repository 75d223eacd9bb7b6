"""Accuracy over the evaluation set, summed exactly over replicas."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def evaluate_accuracy(model, loader, batch_size: int, placement, autocast, num_classes: int) -> dict:
    """Top-1 (and, with >= 5 classes, top-5) accuracy over the whole evaluation set.

    Ten-crop batches ([B, 10, C, H, W]) average the softmax over the crops
    (paper §4.1).  Each replica evaluates its share; the counts are summed.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=placement.device)  # top1, top5, n
    k = min(5, num_classes)
    for x, y in loader.eval_batches(batch_size):
        with autocast():
            if x.dim() == 5:
                b, crops = x.shape[:2]
                scores = F.softmax(model(x.flatten(0, 1)).float(), dim=1).view(b, crops, -1).mean(1)
            else:
                scores = model(x).float()
        topk = scores.topk(k, dim=1).indices
        counts[0] += (topk[:, 0] == y).sum()
        counts[1] += (topk == y[:, None]).any(1).sum()
        counts[2] += y.numel()
    model.train(was_training)
    top1, top5, n = placement.sum_over_replicas(counts).tolist()
    out = {"test_acc": top1 / max(n, 1)}
    if num_classes >= 5:
        out["test_top5"] = top5 / max(n, 1)
    return out
