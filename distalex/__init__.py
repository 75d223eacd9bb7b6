"""distalex: train AlexNet on one device or many -- single, DDP, the 2012 paper's
model-parallel towers, and Krizhevsky's 2014 hybrid ("one weird trick") -- every
placement computing what the single-device reference computes.

The public API (stable whatever the internal layout)::

    import distalex
    cfg = distalex.load_config("configs/tiny.yaml", ["train.epochs=1"])
    summary = distalex.train(cfg)                        # one process
    model = distalex.load_reference("runs/tiny/checkpoints/step_000000561.safetensors")

The names are imported on first use, so ``import distalex`` stays cheap and the
subpackages (model, parallel, training, telemetry, runtime, data) never import
the package's top.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "load_config": "distalex.config",
    "Config": "distalex.config",
    "AlexNet": "distalex.model.alexnet",
    "AlexNetSpec": "distalex.model.alexnet",
    "spec_from_config": "distalex.model.alexnet",
    "init_weights": "distalex.model.alexnet",
    "load_reference": "distalex.training.checkpoint",
    "read_checkpoint": "distalex.training.checkpoint",
    "train": "distalex.training.trainer",
    "DistalexError": "distalex.errors",
    "BadInput": "distalex.errors",
}
_RENAMED = {"read_checkpoint": "read"}  # public name -> the defining module's name

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'distalex' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), _RENAMED.get(name, name))
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
