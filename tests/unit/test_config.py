import pytest
from omegaconf.errors import ReadonlyConfigError

from distalex.config import ConfigError, load_config

from helpers import ROOT


def test_defaults_are_the_seed_experiment():
    cfg = load_config(str(ROOT / "configs" / "d2l_fashion_mnist.yaml"))
    assert (cfg.train.batch_size, cfg.optim.lr, cfg.train.epochs, cfg.data.image_size) == (128, 0.01, 10, 224)
    assert cfg.data.name == "fashion_mnist" and cfg.model.towers == 1 and cfg.optim.momentum == 0


def test_overrides_and_split_mode_resolve_towers():
    cfg = load_config(None, ["optim.lr=0.1", "data.train_limit=100"], split_mode="model-parallel")
    assert cfg.optim.lr == 0.1 and cfg.data.train_limit == 100 and cfg.model.towers == 2
    assert load_config(None, ["model.towers=4"], split_mode="model-parallel").model.towers == 4


def test_config_is_read_only():
    cfg = load_config(None, [])
    with pytest.raises(ReadonlyConfigError):
        cfg.train.batch_size = 3


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.batchsize=3", "train.batchsize"),
        ("train.batch_size=abc", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("optim.lr=-1", "optim.lr"),
        ("train.epochs=0", "train.epochs"),
        ("model.dropout=1.5", "model.dropout"),
        ("data.name=cifar", "data.name"),
        ("train.profile=-1", "train.profile"),
        ("train.peak_tflops=0", "train.peak_tflops"),
        ("ddp.comm_hook=zstd", "ddp.comm_hook"),
        ("ddp.bucket_cap_mb=0", "ddp.bucket_cap_mb"),
        ("ddp.powersgd_rank=0", "ddp.powersgd_rank"),
        ("ddp.powersgd_start_iter=1", "ddp.powersgd_start_iter"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_precision_spellings_and_auto(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    # A bare `no` is YAML's boolean false; it must still mean fp32.
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=fp32"]).train.mixed_precision == "no"
    import torch

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert load_config(None, []).train.mixed_precision == ("bf16" if native else "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    assert load_config(None, []).train.mixed_precision == "fp16"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
