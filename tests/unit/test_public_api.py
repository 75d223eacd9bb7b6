"""What users import from ``distalex`` itself: there whatever the internal layout, cheap to
import, and working end to end (train a tiny run, load its checkpoint as the reference model)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import distalex

from helpers import TINY


def test_every_public_name_is_the_object_its_module_defines():
    for name in distalex.__all__:
        module = importlib.import_module(distalex._API[name])
        assert getattr(distalex, name) is getattr(module, distalex._RENAMED.get(name, name)), name
    assert set(distalex.__all__) <= set(dir(distalex))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        _ = distalex.Trainer


def test_import_distalex_imports_nothing_heavy():
    code = "import sys, distalex; print(sorted(m for m in ('torch', 'accelerate', 'wandb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process state per interpreter; this test's run starts and ends its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_train_then_load_reference(tmp_path, monkeypatch, fresh_accelerate_state):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    cfg = distalex.load_config(
        TINY,
        [
            "data.name=synthetic",
            "data.synthetic_train_size=64",
            "data.synthetic_test_size=32",
            "train.batch_size=32",
            "train.max_steps=2",
            "tracking.plots=false",
            f"train.output_dir={out}",
        ],
    )
    summary = distalex.train(cfg)
    assert summary["steps"] == 2
    ckpt = max((out / "checkpoints").glob("step_*.safetensors"))
    model = distalex.load_reference(str(ckpt))
    assert isinstance(model, distalex.AlexNet) and model.spec == distalex.spec_from_config(cfg)
    saved = distalex.read_checkpoint(str(ckpt))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
