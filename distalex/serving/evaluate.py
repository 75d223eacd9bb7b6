"""``launch/evaluate.py``: score a checkpoint on the evaluation split of its data.

Everything is computed from the weights and the data, through the evaluation
path training uses (:func:`distalex.training.evaluate.evaluation_counts`); the
figures a checkpoint carries are never read.  On N processes (``accelerate
launch``) each evaluates its share of the split and the counts are summed, as
in training.  The output dir is the command's own: checked, locked and never
overwritten without ``--overwrite`` (docs/design.md, "The run directory").
"""

from __future__ import annotations

from pathlib import Path

import torch

from distalex.data import SharedCheck, build_test_data
from distalex.errors import CheckpointError, ConfigError
from distalex.parallel.ddp import DDPOptions
from distalex.parallel.launch import group_timeout, make_accelerator
from distalex.parallel.placement import make_placement
from distalex.runtime import threads
from distalex.runtime.io import write_json
from distalex.runtime.rundir import claim_dir, refuse_reuse
from distalex.serving.loaded import Loaded, reference_model
from distalex.telemetry.plots import plot_confusion
from distalex.training.build import main_process_printer
from distalex.training.evaluate import EvalCounts, evaluation_counts

EVAL_FILES = ("eval.json", "confusion.png")
DIR_KEY = "--output-dir"


def default_output_dir(checkpoint: Path) -> Path:
    """``<run>/checkpoints/step_N.safetensors`` -> ``<run>/eval/step_N`` (beside the run's records)."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run / "eval" / checkpoint.stem


def evaluate_checkpoint(loaded: Loaded, output_dir: Path, overwrite: bool) -> dict:
    """Evaluate on every launched process; the main process writes ``eval.json`` and
    ``confusion.png`` and every process returns the result."""
    cfg, spec = loaded.cfg, loaded.spec
    if cfg.eval.ten_crop and cfg.data.name != "imagefolder":
        raise ConfigError(
            f"eval.ten_crop: ten crops are taken from ImageFolder images resized to data.resize_size; "
            f"data.name={cfg.data.name} has no such images"
        )
    timeout = group_timeout(cfg.train)
    ddp = DDPOptions.from_config(cfg.ddp, spec, gloo=not torch.cuda.is_available())
    threads.configure(cfg.train.threads)  # launchers overwrite OMP_NUM_THREADS (runtime/threads.py)
    accelerator = make_accelerator(cfg.train, ddp, timeout)
    placement = make_placement(cfg.split_mode, spec, cfg.train.batch_size, ddp, timeout, accelerator)
    warn = main_process_printer(placement)
    for notice in [*placement.notices, *loaded.notices]:
        warn(f"distalex: {notice}")
    lock = claim_dir(Path(output_dir), placement, EVAL_FILES, DIR_KEY)
    try:
        return _evaluate(loaded, Path(output_dir), overwrite, accelerator, placement, warn)
    finally:
        lock.release()


def _evaluate(loaded: Loaded, out: Path, overwrite: bool, accelerator, placement, warn) -> dict:
    cfg, spec, p = loaded.cfg, loaded.spec, placement
    # Everything that can refuse the command does so before anything is written.
    check = SharedCheck(p.rank, p.mesh.world_size, p.min_over_ranks, p.is_main and cfg.train.progress)
    loader, data_classes, warnings = build_test_data(cfg, p.replica, p.mesh.replicas, p.device, check, p.input_share())
    for warning in warnings:
        warn(f"distalex: warning: {warning}")
    named = loaded.saved.get("classes") is not None
    if named and tuple(data_classes) != loaded.classes:
        raise CheckpointError(
            f"checkpoint '{loaded.path}' was trained on the classes {list(loaded.classes)[:5]}..., the data names "
            f"{list(data_classes)[:5]}...: its predictions would be scored against other labels"
        )
    classes = loaded.classes if named else tuple(data_classes)
    refuse_reuse(out, EVAL_FILES, overwrite, DIR_KEY, p)

    model = p.local_model(reference_model(loaded)).to(p.device)
    if cfg.train.channels_last:  # the layout training evaluates in, so its figures are reproduced exactly
        model = model.to(memory_format=torch.channels_last)
    eval_batch = max(1, (cfg.eval.batch_size or cfg.train.batch_size) // p.mesh.replicas)
    counts = evaluation_counts(p.inference_model(model), loader, eval_batch, p, accelerator.autocast, spec.num_classes)
    result = describe(loaded, counts, classes, cfg, p, accelerator.mixed_precision)
    if p.is_main:
        write_json(out / "eval.json", result)
        title = f"{loaded.path.name}: top-1 {result['top1']:.4f} on {result['examples']} examples"
        plot_confusion(counts.confusion.tolist(), classes, out / "confusion.png", title=title)
    p.barrier()
    return result


def describe(loaded: Loaded, counts: EvalCounts, classes, cfg, placement, precision: str) -> dict:
    """The contents of ``eval.json``: what was evaluated, how, and every figure."""
    figures = counts.figures()
    rows = counts.confusion.sum(1).tolist()
    out = {
        "checkpoint": str(loaded.path),
        "step": loaded.saved["position"]["step"],
        "data": cfg.data.name,
        "split": "val" if cfg.data.name == "imagefolder" else "test",
        "examples": counts.n,
        "top1": figures["test_acc"],
        "ten_crop": bool(cfg.eval.ten_crop and cfg.data.name == "imagefolder"),
        "classes": list(classes),
        "per_class": [
            {"class": name, "examples": int(n), "accuracy": acc}
            for name, n, acc in zip(classes, rows, counts.per_class(), strict=True)
        ],
        "confusion": counts.confusion.tolist(),  # rows: true class, columns: predicted class
        "split_mode": cfg.split_mode,
        "world_size": placement.mesh.world_size,
        "mixed_precision": precision,
    }
    if "test_top5" in figures:
        out["top5"] = figures["test_top5"]
    return out
