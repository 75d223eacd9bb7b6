"""Command lines: ``launch/train.py [--config PATH] [--split-mode MODE] [key=value ...]``, and
the trained model in use: ``launch/evaluate.py``, ``launch/predict.py``, ``launch/export.py``
(docs/use.md; their work is done in :mod:`distalex.serving`).

Exit status (docs/design.md, "Exit statuses"): 0 success; 2 bad input (config,
data, checkpoint, output dir); 1 other failure (including a non-finite loss);
128+signal (143 for SIGTERM, 130 for SIGINT) when a signal stopped the run
after writing a checkpoint.  Every status comes from the error's class
(:mod:`distalex.errors`), mapped here and nowhere else.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from distalex.config import SPLIT_MODES, load_config, path_problem, shown_text
from distalex.errors import DistalexError, Interrupted, UsageError
from distalex.runtime.launcher import is_main_process, launcher_env

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
    return is_main_process()  # the launcher's RANK, checked (every process when it is bad)


def report(exc: DistalexError) -> int:
    """One line on the main process; the exit status the error stands for."""
    if exc.every_process or _is_main_process():
        prefix = "distalex: error: " if exc.label == "error" else "distalex: "
        print(prefix + str(exc), file=sys.stderr, flush=True)
    return exc.exit_code


TRAIN_SIGINT = (
    "outside the training steps (start-up or the end of the run), so no checkpoint was written for it; "
    "train.resume=auto continues from the newest checkpoint, if any"
)


def guarded(body, interrupted: str, cleanup=None) -> tuple[int, object]:
    """The one place an exception becomes an exit status (and one line): ``(0, body())``, or
    ``(status, None)`` after printing the line.  A :class:`DistalexError` is its own status;
    Ctrl-C outside the training loop's handler (importing, building, finishing) is 130 with
    ``interrupted`` as its line; a process-group error (a peer that timed out or died, a
    failed rendezvous) is 1 (:func:`distalex.parallel.launch.process_group_failure`).
    Anything else is a bug and keeps its traceback.  ``cleanup`` runs in every case."""
    try:
        try:
            return 0, body()
        finally:
            if cleanup is not None:
                cleanup()
    except DistalexError as exc:
        return report(exc), None
    except KeyboardInterrupt:
        return report(Interrupted(signal.SIGINT, None, interrupted)), None
    except Exception as exc:
        launch = sys.modules.get("distalex.parallel.launch")  # imported wherever a process group exists
        failure = launch.process_group_failure(exc) if launch is not None else None
        if failure is None:
            raise
        return report(failure), None


def _shutdown() -> None:
    """Process groups' orderly end, if this process has any (without importing torch otherwise)."""
    launch = sys.modules.get("distalex.parallel.launch")
    if launch is not None:
        launch.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    config_path = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)

    def run():
        launcher_env()  # before anything reads a launcher variable
        cfg = load_config(config_path, args.overrides, args.split_mode)
        from distalex.training.trainer import train

        return cfg, train(cfg)

    status, result = guarded(run, TRAIN_SIGINT, cleanup=_shutdown)
    if status:
        return status
    cfg, summary = result
    if _is_main_process():
        keys = ("loss", "train_acc", "test_acc", "examples_per_sec", "wall_time_s")
        figures = ", ".join(f"{k} {summary[k]:.4g}" for k in keys if summary.get(k) is not None)
        print(f"distalex: done: {figures} -> {cfg.train.output_dir}", flush=True)
    return 0


def main_exit() -> None:
    sys.exit(main())


# -- the trained model in use: evaluate, predict, export (docs/use.md) ---------------------
class _OneLineParser(argparse.ArgumentParser):
    """A usage error is bad input like any other: one ``distalex: error:`` line, exit 2."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


# The command lines' path arguments, checked (like the config's path keys) before any is used.
PATH_ARGS = {"checkpoint": "checkpoint", "config": "--config", "output_dir": "--output-dir", "grid": "--grid",
             "out": "--out", "images": "IMAGE"}  # fmt: skip


def _check_paths(args: argparse.Namespace) -> None:
    """Every path argument is one the OS accepts (length limits, encodable, no NUL), else one
    UsageError line naming the argument: never an OSError traceback from deep inside."""
    for attr, name in PATH_ARGS.items():
        values = getattr(args, attr, None)
        for value in values if isinstance(values, list) else [values]:
            problem = path_problem(value) if isinstance(value, str) else None
            if problem is not None:
                raise UsageError(f"{name} '{shown_text(value[:40])}{'...' if len(value) > 40 else ''}': {problem}")


def _parse(parser: argparse.ArgumentParser, argv, intermixed: bool = True):
    try:
        args = (parser.parse_intermixed_args if intermixed else parser.parse_args)(argv)
        _check_paths(args)
        return args, None
    except UsageError as exc:
        return None, report(exc)


COMMAND_SIGINT = "the command did not finish; nothing it would write was written"


def _checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint file (<output_dir>/checkpoints/step_N.safetensors)")
    parser.add_argument(
        "--config", default=None, help="experiment YAML to use instead of the config stored in the checkpoint"
    )


def parse_evaluate_args(argv=None):
    parser = _OneLineParser(prog="launch/evaluate.py", description="Evaluate a checkpoint on its test/val split.")
    _checkpoint_args(parser)
    parser.add_argument("--split-mode", choices=SPLIT_MODES, default=None, help="default: ddp on N > 1 processes")
    parser.add_argument("--output-dir", default=None, help="default: <run>/eval/<checkpoint name>")
    parser.add_argument("--ten-crop", action="store_true", help="ImageFolder: average the softmax over 10 crops")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in the output dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.root=..., ...)")
    return _parse(parser, argv)


def evaluate_main(argv=None) -> int:
    args, status = parse_evaluate_args(argv)
    if args is None:
        return status

    def run():
        world = launcher_env().world_size
        from distalex.serving.evaluate import default_output_dir, evaluate_checkpoint
        from distalex.serving.loaded import open_checkpoint

        split_mode = args.split_mode or ("ddp" if world > 1 else "single")
        overrides = [*args.overrides, *(["eval.ten_crop=true"] if args.ten_crop else [])]
        loaded = open_checkpoint(args.checkpoint, args.config, overrides, split_mode)
        out = Path(args.output_dir) if args.output_dir else default_output_dir(loaded.path)
        return out, evaluate_checkpoint(loaded, out, args.overwrite)

    status, done = guarded(run, COMMAND_SIGINT, cleanup=_shutdown)
    if status:
        return status
    out, result = done
    if _is_main_process():
        top5 = f", top-5 {result['top5']:.4f}" if "top5" in result else ""
        crops = " (ten crops)" if result["ten_crop"] else ""
        print(
            f"distalex: evaluated step {result['step']} on {result['examples']} {result['split']} examples{crops}: "
            f"top-1 {result['top1']:.4f}{top5} -> {out / 'eval.json'}",
            flush=True,
        )
    return 0


def parse_predict_args(argv=None):
    parser = _OneLineParser(prog="launch/predict.py", description="Predict the classes of images.")
    _checkpoint_args(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files or folders of them")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--ten-crop", action="store_true", help="ImageFolder: average the softmax over 10 crops")
    parser.add_argument("--grid", default=None, metavar="PNG", help="also draw the images with their predictions")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    return _parse(parser, argv)


def predict_main(argv=None) -> int:
    args, status = parse_predict_args(argv)
    if args is None:
        return status

    def run():
        launcher_env()
        from distalex.serving.loaded import open_checkpoint
        from distalex.serving.predict import predict

        loaded = open_checkpoint(args.checkpoint, args.config)
        return predict(
            loaded,
            args.images,
            args.top_k,
            args.ten_crop,
            grid,
            args.overwrite,
            emit=lambda line: print(line, flush=True),
            notify=lambda line: print(line, file=sys.stderr, flush=True),
        )

    grid = Path(args.grid) if args.grid else None
    status, n = guarded(run, COMMAND_SIGINT)
    if status:
        return status
    if grid is not None:
        print(f"distalex: {n} images drawn -> {grid}", file=sys.stderr, flush=True)
    return 0


def parse_export_args(argv=None):
    parser = _OneLineParser(prog="launch/export.py", description="Export a checkpoint's network, verified.")
    _checkpoint_args(parser)
    parser.add_argument("--format", required=True, metavar="onnx|pt2|state-dict", help="what to write")
    parser.add_argument(
        "--out", default=None, help="default: beside the checkpoint, step_N.onnx|.pt2|.state_dict.safetensors"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.root=..., ...)")
    return _parse(parser, argv)


def export_main(argv=None) -> int:
    args, status = parse_export_args(argv)
    if args is None:
        return status

    def run():
        launcher_env()
        from distalex.serving.export import check_format, default_out, export
        from distalex.serving.loaded import open_checkpoint

        fmt = check_format(args.format)
        loaded = open_checkpoint(args.checkpoint, args.config, args.overrides)
        out = Path(args.out) if args.out else default_out(loaded.path, fmt)
        return fmt, export(
            loaded, fmt, out, args.overwrite, notify=lambda line: print(line, file=sys.stderr, flush=True)
        )

    status, done = guarded(run, COMMAND_SIGINT)
    if status:
        return status
    fmt, result = done
    print(
        f"distalex: exported {fmt} -> {result['out']} ({result['bytes'] / 1e6:.3g} MB); verified against the "
        f"reference model on {'; '.join(result['checks'])}: max |difference| {result['max_abs_diff']:.3g} = "
        f"{result['max_rel_diff']:.3g} of the largest |logit| (allowed 1e-05); {result['seconds']:.3g} s",
        flush=True,
    )
    return 0


def evaluate_exit() -> None:
    sys.exit(evaluate_main())


def predict_exit() -> None:
    sys.exit(predict_main())


def export_exit() -> None:
    sys.exit(export_main())
