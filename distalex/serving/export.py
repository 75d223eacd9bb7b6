"""``launch/export.py``: the reference model as ONNX, ``torch.export`` (.pt2) or a plain
state dict, each verified before the command says it is done.

The export is written to a temporary file beside ``--out``, loaded back the way a
user would load it (onnxruntime, ``torch.export.load``, safetensors into a fresh
module) and run on random batches of several sizes (the batch dimension is
dynamic) and on real images of the checkpoint's evaluation split.  Only when
every output is within ``TOLERANCE`` x the largest |logit| of the reference
model's (fp32) is it renamed to ``--out``; otherwise nothing is kept (exit 1).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distalex.data import build_test_data
from distalex.errors import DataError, ExportFailure, UsageError
from distalex.runtime.io import open_for_reading
from distalex.serving.loaded import Loaded, reference_model
from distalex.serving.predict import check_output_file

FORMATS = ("onnx", "pt2", "state-dict")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "state-dict": ".state_dict.safetensors"}
TOLERANCE = 1e-5  # max |exported - reference| over the largest |reference logit|
RANDOM_BATCHES = (1, 3)  # sizes other than the traced one's: the batch dimension is really dynamic
TRACE_BATCH = 2  # torch.export specialises a dimension of size 1, so trace with 2
REAL_IMAGES = 8
INPUT, OUTPUT = "images", "logits"


def default_out(checkpoint: Path, fmt: str) -> Path:
    """``step_N.safetensors`` -> ``step_N.onnx`` / ``step_N.pt2`` / ``step_N.state_dict.safetensors``."""
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"--format: unknown format '{fmt}' (one of {', '.join(FORMATS)})")
    return fmt


def export(loaded: Loaded, fmt: str, out: Path, overwrite: bool, notify: Callable[[str], None]) -> dict:
    """Write and verify the export; the verification's figures."""
    check_format(fmt)
    check_output_file(out, overwrite, "--out")
    writer, runner = {
        "onnx": (_write_onnx, _run_onnx),
        "pt2": (_write_pt2, _run_pt2),
        "state-dict": (_write_state_dict, _run_state_dict),
    }[fmt]
    if fmt == "onnx":
        _need_onnx()
    for notice in loaded.notices:
        notify(f"distalex: notice: {notice}")
    model = reference_model(loaded)
    inputs = verification_inputs(loaded, notify)
    started = time.perf_counter()
    # The writers (torch.onnx.export, torch.export.save, safetensors) take a path and would
    # follow a link planted under a predictable temporary name; a fresh private folder beside
    # --out (mkdtemp: mode 0700, a name nobody could have chosen) holds the temporary file
    # instead, and the rename stays on --out's file system.  It ends like the final file:
    # torch.export.load insists on ".pt2".
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.export-") as folder:
        tmp = Path(folder) / f"model{out.suffix}"
        with torch.no_grad():
            writer(model, loaded, tmp)
            run = runner(tmp, loaded)
            figures = verify(model, run, inputs)
        check_output_file(out, overwrite, "--out")  # nothing planted at --out meanwhile
        os.replace(tmp, out)
    figures.update({"format": fmt, "out": str(out), "bytes": out.stat().st_size})
    figures["seconds"] = time.perf_counter() - started
    return figures


def verification_inputs(loaded: Loaded, notify) -> list[tuple[str, torch.Tensor]]:
    """(what, batch) pairs: random batches of several sizes and, where the data can be
    read, the first images of the evaluation split, preprocessed as evaluation does."""
    spec = loaded.spec
    g = torch.Generator().manual_seed(0)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    inputs = [(f"random batch of {b}", torch.rand(b, *shape, generator=g)) for b in RANDOM_BATCHES]
    try:
        loader, _, _ = build_test_data(loaded.cfg, 0, 1, torch.device("cpu"))
        x, _ = next(iter(loader.eval_batches(REAL_IMAGES)))
    except DataError as exc:
        notify(f"distalex: notice: verified on random inputs only: the evaluation data cannot be read ({exc})")
        return inputs
    x = x[:, 4] if x.dim() == 5 else x  # ten crops: the centre one (crop 4), the network's input as in prediction
    inputs.append((f"{len(x)} {loaded.cfg.data.name} evaluation images", x.contiguous()))
    return inputs


def verify(model, run, inputs) -> dict:
    """Run the export and the reference model on every input; ExportFailure past TOLERANCE."""
    worst_diff, worst_ratio, examples = 0.0, 0.0, 0
    for what, x in inputs:
        expected = model(x)
        got = torch.as_tensor(run(x))
        if got.shape != expected.shape:
            raise ExportFailure(f"the export gives outputs of shape {tuple(got.shape)} for {what}, "
                                f"the model {tuple(expected.shape)}; nothing was kept")  # fmt: skip
        diff = (got - expected).abs().max().item()
        scale = expected.abs().max().item()
        ratio = diff / max(scale, 1e-30)
        if not ratio <= TOLERANCE:  # also catches NaN
            raise ExportFailure(
                f"the export differs from the reference model by {diff:.3g} on {what} (largest |logit| "
                f"{scale:.3g}, allowed {TOLERANCE:g} of it); nothing was kept"
            )
        worst_diff, worst_ratio = max(worst_diff, diff), max(worst_ratio, ratio)
        examples += len(x)
    return {"max_abs_diff": worst_diff, "max_rel_diff": worst_ratio, "checked_inputs": examples,
            "checks": [what for what, _ in inputs]}  # fmt: skip


def _open_back(path: Path):
    """The export just written, opened to be loaded back as a user would (through the one
    guarded opener: what is read is the regular file written, nothing put there since)."""
    return open_for_reading(path, what="the export's temporary file", max_bytes=None, error=ExportFailure)


def _read_back(path: Path) -> bytes:
    with _open_back(path) as fh:
        return fh.read()


def _example(loaded: Loaded) -> torch.Tensor:
    s = loaded.spec
    return torch.rand(
        TRACE_BATCH, s.in_channels, s.image_size, s.image_size, generator=torch.Generator().manual_seed(1)
    )


def _batch_dim():
    return ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f'--format onnx needs the export extra ({exc.name} is not installed): pip install -e ".[export]"'
        ) from None


def _quietly(fn, *args, **kwargs):
    """torch.onnx.export prints its progress; keep the command's stdout for its result."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _write_onnx(model, loaded: Loaded, path: Path) -> None:
    _quietly(
        torch.onnx.export,
        model,
        (_example(loaded),),
        str(path),
        dynamo=True,
        dynamic_shapes=_batch_dim(),
        input_names=[INPUT],
        output_names=[OUTPUT],
        external_data=False,  # one file (the weights inside): it is renamed after the check
    )


def _run_onnx(path: Path, loaded: Loaded):
    import onnxruntime

    session = onnxruntime.InferenceSession(_read_back(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def _write_pt2(model, loaded: Loaded, path: Path) -> None:
    program = torch.export.export(model, (_example(loaded),), dynamic_shapes=_batch_dim())
    torch.export.save(program, str(path))


def _run_pt2(path: Path, loaded: Loaded):
    with _open_back(path) as fh:
        return torch.export.load(fh).module()


def state_dict_metadata(loaded: Loaded) -> dict[str, str]:
    """What the plain-PyTorch loader in docs/use.md needs besides the tensors (JSON strings)."""
    return {
        "format": "pt",
        "distalex_spec": json.dumps(loaded.saved["spec"], sort_keys=True),
        "classes": json.dumps(list(loaded.classes)),
    }


def _write_state_dict(model, loaded: Loaded, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=state_dict_metadata(loaded))


def _run_state_dict(path: Path, loaded: Loaded):
    from safetensors.torch import load

    from distalex.model.alexnet import AlexNet

    fresh = AlexNet(loaded.spec).eval()
    fresh.load_state_dict(load(_read_back(path)), strict=True)
    return fresh
