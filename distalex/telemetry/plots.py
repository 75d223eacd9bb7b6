"""Training curves and run comparisons with matplotlib (Agg: no display needed).

``plot_curves`` draws what d2l's Animator shows during training -- train loss,
train accuracy and test accuracy against epoch -- from the rows of a run's
``metrics.jsonl``.  ``plot_comparison`` overlays several runs' curves and adds
a throughput bar chart.  Both write PNGs atomically (temporary file, then
rename), so a reader never sees a half-written image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot; training runs on machines without a display
import matplotlib.pyplot as plt

from distalex.runtime.io import atomic_write

Series = tuple[list[float], list[float]]


def _num(v) -> float | None:
    """A finite number, or None (metrics.jsonl stores NaN/inf as strings)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _series(rows: Iterable[dict], key: str) -> Series:
    xs, ys = [], []
    for r in rows:
        x, y = _num(r.get("epoch")), _num(r.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def curve_series(rows: Sequence[dict]) -> dict:
    """{'train loss', 'train acc', 'test acc'} -> (epochs, values).

    Epoch rows are those with ``test_acc``.  Train loss uses the per-interval
    step rows when the run logged any (a finer curve, like d2l's), else the
    epoch rows; the accuracies come from the epoch rows.
    """
    epoch_rows = [r for r in rows if "test_acc" in r]
    step_rows = [r for r in rows if "test_acc" not in r and "train_acc" not in r]
    loss = _series(step_rows, "loss")
    if not loss[0]:
        loss = _series(epoch_rows, "loss")
    return {
        "train loss": loss,
        "train acc": _series(epoch_rows, "train_acc"),
        "test acc": _series(epoch_rows, "test_acc"),
    }


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _epoch_axis(ax, xs_all: list[float]) -> None:
    ax.set_xlabel("epoch")
    if xs_all:
        hi = max(xs_all)
        ax.set_xlim(0, max(hi, 1.0) * 1.02)
    ax.grid(True, alpha=0.3)


STYLE = {
    "train loss": dict(linestyle="-", color="C0"),
    "train acc": dict(linestyle="--", color="C1"),
    "test acc": dict(linestyle="-.", color="C2"),
}


def plot_curves(rows: Sequence[dict], path, title: str | None = None) -> Path | None:
    """Write the d2l-style curves of one run; returns the path, or None when
    there is nothing to plot yet."""
    series = curve_series(rows)
    if not any(xs for xs, _ in series.values()):
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    xs_all = []
    for label, (xs, ys) in series.items():
        if not xs:
            continue
        xs_all += xs
        marker = "o" if len(xs) <= 20 and label != "train loss" else None
        ax.plot(xs, ys, label=label, marker=marker, markersize=4, **STYLE[label])
    _epoch_axis(ax, xs_all)
    ax.legend(loc="best", fontsize="small")
    if title:
        ax.set_title(title, fontsize="small")
    return _save(fig, path)


def plot_comparison(runs: Sequence[dict], path) -> Path:
    """Several runs side by side.  Each run: {'label', 'rows' (metrics.jsonl
    rows, may be empty), 'examples_per_sec' (may be None)}.

    Left: train loss; middle: test accuracy (solid) and train accuracy
    (dashed); right: training throughput, one bar per run.
    """
    fig, (ax_loss, ax_acc, ax_bar) = plt.subplots(1, 3, figsize=(14, 4))
    loss_x, acc_x = [], []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        series = curve_series(run.get("rows") or [])
        xs, ys = series["train loss"]
        if xs:
            ax_loss.plot(xs, ys, color=color, label=run["label"])
            loss_x += xs
        for key, style, label in (
            ("test acc", "-", f"{run['label']} test"),
            ("train acc", "--", f"{run['label']} train"),
        ):
            xs, ys = series[key]
            if xs:
                ax_acc.plot(
                    xs,
                    ys,
                    linestyle=style,
                    color=color,
                    label=label,
                    marker="o" if len(xs) <= 20 else None,
                    markersize=3,
                )
                acc_x += xs
    ax_loss.set_title("train loss")
    ax_acc.set_title("accuracy")
    _epoch_axis(ax_loss, loss_x)
    _epoch_axis(ax_acc, acc_x)
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend(loc="best", fontsize="x-small")

    labels = [run["label"] for run in runs]
    rates = [_num(run.get("examples_per_sec")) or 0.0 for run in runs]
    bars = ax_bar.bar(range(len(runs)), rates, color=[f"C{i % 10}" for i in range(len(runs))])
    for bar, rate in zip(bars, rates, strict=True):
        ax_bar.annotate(
            f"{rate:,.0f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax_bar.set_xticks(range(len(runs)))
    ax_bar.set_xticklabels(labels, rotation=20, ha="right", fontsize="small")
    ax_bar.set_ylabel("examples / sec")
    ax_bar.set_title("training throughput")
    ax_bar.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _profile_colors(categories: Sequence[str]) -> dict:
    """Blues for the convolutions, greens for the fully connected layers, reds for
    communication, gold for data, purples for loss/optimizer, grey for the rest."""
    blues, greens = plt.get_cmap("Blues"), plt.get_cmap("Greens")
    reds = ["#e377c2", "#bcbd22", "#17becf"]  # communication not named below
    fixed = {"data": "#e6b800", "loss": "#c5b0d5", "optimizer": "#9467bd", "other": "#c7c7c7"}
    fixed.update({"comm:ddp": "#d62728", "comm:tower": "#ff7f0e", "comm:hybrid": "#8c564b", "comm:other": "#f7b6d2"})
    fixed.update({f"conv{i}": blues(0.35 + 0.13 * (i - 1)) for i in range(1, 6)})
    fixed.update({f"fc{i}": greens(0.4 + 0.2 * (i - 6)) for i in range(6, 9)})
    out, spare = {}, iter(reds + [f"C{i}" for i in range(10)])
    for c in categories:
        out[c] = fixed.get(c) or next(spare)
    return out


def plot_profile(bars: Sequence[tuple[str, dict]], path, title: str | None = None) -> Path:
    """One stacked horizontal bar per (label, profile entry): milliseconds per training
    step by category (``entry['ms_per_step']``), categories in the entries' order."""
    categories: list[str] = []
    for _, entry in bars:
        categories += [c for c in entry["ms_per_step"] if c not in categories]
    # Keep the first entry's order, then any category only later entries have, 'other' last.
    categories = [c for c in categories if c != "other"] + (["other"] if "other" in categories else [])
    colors = _profile_colors(categories)
    fig, ax = plt.subplots(figsize=(11, max(3.2, 1.2 + 0.55 * len(bars))))
    ys = list(range(len(bars)))[::-1]  # first bar on top
    widest = max((sum(e["ms_per_step"].values()) for _, e in bars), default=0.0) or 1.0
    for y, (_, entry) in zip(ys, bars, strict=True):
        left = 0.0
        for c in categories:
            ms = entry["ms_per_step"].get(c, 0.0)
            if ms <= 0:
                continue
            ax.barh(y, ms, left=left, color=colors[c], edgecolor="white", linewidth=0.5, height=0.7)
            if ms >= 0.06 * widest:  # name the wide segments inside the bar, readable on dark colours
                r, g, b = matplotlib.colors.to_rgb(colors[c])
                ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                text = f"{c}\n{ms:.0f}" if ms >= 10 else f"{c}\n{ms:.2g}"
                ax.text(left + ms / 2, y, text, ha="center", va="center", fontsize=7, color=ink)
            left += ms
        ax.text(left + 0.01 * widest, y, f"{left:,.1f} ms", va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([label for label, _ in bars], fontsize=8)
    ax.set_xlim(0, widest * 1.12)
    ax.set_xlabel("milliseconds per training step")
    ax.grid(True, axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in categories]
    ax.legend(handles, categories, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              ncol=1 if len(categories) <= 2 + 5 * len(bars) else 2)  # fmt: skip
    ax.set_title(title or "where a training step's time goes", fontsize=9)
    return _save(fig, path)


def plot_confusion(confusion, classes: Sequence[str], path, title: str | None = None) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with the class names on
    both axes and the counts in the cells (up to 30 classes; beyond, the colours only)."""
    import numpy as np

    m = np.asarray(confusion, dtype=np.float64)
    n = len(classes)
    side = min(max(4.0, 0.45 * n + 2.0), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    rows = m.sum(1, keepdims=True)
    shares = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)  # colour: share of the true class
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    labels_shown = n <= 60
    ax.set_xticks(range(n), classes if labels_shown else [], rotation=45 if n > 4 else 0, ha="right")
    ax.set_yticks(range(n), classes if labels_shown else [])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize="small", color=colour)
    if title:
        ax.set_title(title, fontsize="small")
    return _save(fig, path)


def plot_predictions(images: Sequence, titles: Sequence[str], path, correct: Sequence | None = None) -> Path:
    """A grid of images (H x W or H x W x 3 uint8 arrays) with a title each; with ``correct``
    (one bool or None per image) right predictions are titled in green, wrong ones in red."""
    n = len(images)
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = images[i]
        ax.imshow(image, cmap="gray" if getattr(image, "ndim", 3) == 2 else None, vmin=0, vmax=255)
        ok = None if correct is None else correct[i]
        colour = "black" if ok is None else ("green" if ok else "red")
        ax.set_title(titles[i], fontsize="small", color=colour)
    fig.tight_layout()
    return _save(fig, path)
