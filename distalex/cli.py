"""Command line: ``launch/train.py [--config PATH] [--split-mode MODE] [key=value ...]``.

Exit status (docs/design.md, "Exit statuses"): 0 success; 2 bad input (config,
data, checkpoint, output dir); 1 other failure (including a non-finite loss);
128+signal (143 for SIGTERM, 130 for SIGINT) when a signal stopped the run
after writing a checkpoint.  Every status comes from the error's class
(:mod:`distalex.errors`), mapped here and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distalex.config import SPLIT_MODES, load_config
from distalex.errors import DistalexError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "d2l_fashion_mnist.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py", description="Train AlexNet with distalex.")
    parser.add_argument(
        "--config",
        default=None,
        help="experiment YAML (default: configs/d2l_fashion_mnist.yaml, the d2l baseline experiment)",
    )
    parser.add_argument(
        "--split-mode",
        choices=SPLIT_MODES,
        default=None,
        help="placement: single device, DDP replicas, the paper's model-parallel towers, or hybrid "
        "(data-parallel convolutions, model-parallel fully-connected layers)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf dot-list overrides")
    return parser.parse_intermixed_args(argv)  # flags may follow the key=value overrides


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def report(exc: DistalexError) -> int:
    """One line on the main process; the exit status the error stands for."""
    if _is_main_process():
        prefix = "distalex: error: " if exc.label == "error" else "distalex: "
        print(prefix + str(exc), file=sys.stderr, flush=True)
    return exc.exit_code


def main(argv=None) -> int:
    args = parse_args(argv)
    config_path = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    from distalex.parallel.launch import shutdown

    try:
        cfg = load_config(config_path, args.overrides, args.split_mode)
        from distalex.training.trainer import train

        summary = train(cfg)
    except DistalexError as exc:
        return report(exc)
    finally:
        shutdown()
    if _is_main_process():
        keys = ("loss", "train_acc", "test_acc", "examples_per_sec", "wall_time_s")
        figures = ", ".join(f"{k} {summary[k]:.4g}" for k in keys if summary.get(k) is not None)
        print(f"distalex: done: {figures} -> {cfg.train.output_dir}", flush=True)
    return 0


def main_exit() -> None:
    sys.exit(main())
