"""A checkpoint opened for use: its contents, the config it is used under, its class names.

The config is the one the checkpoint was trained with (stored in it), or a YAML
file given instead, with ``key=value`` overrides on top; either way it must
describe the checkpoint's network, else the command is refused (exit 2) before
anything is written.  Nothing in the file is executed (safetensors + JSON,
:func:`distalex.training.checkpoint.read`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distalex.config import load_config
from distalex.errors import CheckpointError
from distalex.model.alexnet import AlexNetSpec, spec_from_config
from distalex.training import checkpoint


@dataclass
class Loaded:
    path: Path
    saved: dict  # the checkpoint's contents, every field checked
    cfg: object  # the validated, read-only config it is used under
    spec: AlexNetSpec
    classes: tuple[str, ...]  # names in label order (indices for checkpoints without names)
    notices: list[str]


def open_checkpoint(path, config_path=None, overrides=(), split_mode=None) -> Loaded:
    """The checkpoint at ``path`` with its config (or ``config_path``'s) and ``overrides``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    saved = checkpoint.read(path)
    base = None if config_path else saved["config"]
    cfg = load_config(config_path, list(overrides), split_mode, base=base, base_name=f"checkpoint '{path}' config")
    spec = spec_from_config(cfg)
    try:
        checkpoint.check_architecture(saved, spec, path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}: the checkpoint does not match the config") from None
    notices = []
    classes = checkpoint.class_names(saved)
    if classes is None:
        classes = tuple(str(i) for i in range(spec.num_classes))
        notices.append(
            f"checkpoint {path} carries no class names (written before they were recorded): classes are "
            f"called by their index 0..{spec.num_classes - 1}"
        )
    return Loaded(path, saved, cfg, spec, classes, notices)


def reference_model(loaded: Loaded):
    """The plain reference model at the checkpoint's weights, in eval mode, fp32 on the CPU."""
    return checkpoint.reference_from_state(loaded.saved, loaded.path).eval()
