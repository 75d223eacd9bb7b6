"""Command line: ``launch/train.py [--config PATH] [--split-mode MODE] [key=value ...]``.

Exit status: 0 success; 2 bad input (config, data, checkpoint, output dir);
1 other failure (including a non-finite loss); 128+signal (143 for SIGTERM,
130 for SIGINT) when a signal stopped the run after writing a checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distalex.checkpoint import CheckpointError
from distalex.config import SPLIT_MODES, ConfigError, load_config
from distalex.data import DataError
from distalex.model import ModelSpecError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "d2l_fashion_mnist.yaml"
BAD_INPUT = (ConfigError, DataError, CheckpointError, ModelSpecError)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py", description="Train AlexNet with distalex.")
    parser.add_argument("--config", default=None,
                        help="experiment YAML (default: configs/d2l_fashion_mnist.yaml, the seed experiment)")
    parser.add_argument("--split-mode", choices=SPLIT_MODES, default=None,
                        help="placement: single device, DDP replicas, or the paper's model-parallel towers")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf dot-list overrides")
    return parser.parse_intermixed_args(argv)  # flags may follow the key=value overrides


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _fail(message: str, status: int) -> int:
    if _rank() == 0:
        print(f"distalex: error: {message}", file=sys.stderr, flush=True)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    config_path = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    try:
        cfg = load_config(config_path, args.overrides, args.split_mode)
        from distalex.train import Interrupted, NonFiniteLoss, RunDirError, train
    except BAD_INPUT as exc:
        return _fail(str(exc), 2)
    from distalex.parallel import shutdown
    try:
        summary = train(cfg)
    except BAD_INPUT + (RunDirError,) as exc:
        return _fail(str(exc), 2)
    except NonFiniteLoss as exc:
        return _fail(str(exc), 1)
    except Interrupted as exc:
        if _rank() == 0:
            print(f"distalex: {exc}", file=sys.stderr, flush=True)
        return 128 + int(exc.signum)
    finally:
        shutdown()
    if _rank() == 0:
        keys = ("loss", "train_acc", "test_acc", "examples_per_sec", "wall_time_s")
        print("distalex: done: " + ", ".join(f"{k} {summary[k]:.4g}" for k in keys if summary.get(k) is not None)
              + f" -> {cfg.train.output_dir}", flush=True)
    return 0


def main_exit() -> None:
    sys.exit(main())
