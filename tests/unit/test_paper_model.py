"""The paper's network (configs/paper_imagenet.yaml): size, geometry and per-tower LRN."""

from pathlib import Path

import pytest
import torch
from torch import nn

from distalex.config import load_config
from distalex.model.alexnet import AlexNet, TowerLRN, count_parameters, spec_from_config

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "paper_imagenet.yaml")


def conv_params(c_in, c_out, k, groups=1):
    return c_out * (c_in // groups) * k * k + c_out


def fc_params(n_in, n_out):
    return n_in * n_out + n_out


@pytest.fixture(scope="module")
def paper_cfg():
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def paper_model(paper_cfg):
    return AlexNet(spec_from_config(paper_cfg)).eval()


def test_config_is_the_paper_recipe(paper_cfg):
    m, d, o, t = paper_cfg.model, paper_cfg.data, paper_cfg.optim, paper_cfg.train
    assert (m.towers, m.lrn, m.in_channels, m.num_classes, m.init) == (2, True, 3, 1000, "paper")
    assert (d.name, d.image_size, d.resize_size, d.pca_sigma) == ("imagefolder", 224, 256, 0.1)
    assert m.dropout == 0.5 and paper_cfg.eval.ten_crop
    assert (o.lr, o.momentum, o.weight_decay, o.schedule, o.plateau_factor) == (0.01, 0.9, 5e-4, "plateau", 0.1)
    assert (t.epochs, t.batch_size) == (90, 128)


def test_paper_parameter_count(paper_model):
    # Per-layer arithmetic (weights + biases), paper §3.5 / Fig. 2 with 2 towers:
    # conv2, conv4, conv5 read only their own tower (groups=2); conv3, fc6-8 read all.
    side = (224 + 2 * 2 - 11) // 4 + 1  # conv1 maps: 55
    assert side == 55
    for _ in range(3):  # three overlapping 3/2 max-pools
        side = (side - 3) // 2 + 1  # 27, 13, 6
    assert side == 6
    per_layer = {
        "conv1": conv_params(3, 96, 11),  #     34,944
        "conv2": conv_params(96, 256, 5, groups=2),  #    307,456
        "conv3": conv_params(256, 384, 3),  #    885,120
        "conv4": conv_params(384, 384, 3, groups=2),  #    663,936
        "conv5": conv_params(384, 256, 3, groups=2),  #    442,624
        "fc6": fc_params(256 * side * side, 4096),  # 37,752,832
        "fc7": fc_params(4096, 4096),  # 16,781,312
        "fc8": fc_params(4096, 1000),  #  4,097,000
    }
    expected = sum(per_layer.values())
    assert 60_000_000 < expected < 62_000_000  # "60 million parameters" (abstract)
    got = {name: count_parameters(getattr(paper_model, name)) for name in per_layer}
    assert got == per_layer
    assert count_parameters(paper_model) == expected


def test_paper_geometry_55x55_conv1(paper_model):
    model = paper_model
    seen = {}

    def record(module, inputs, output):
        seen["conv1"] = tuple(output.shape)

    handle = model.conv1.register_forward_hook(record)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, 224, 224))
    finally:
        handle.remove()
    assert seen["conv1"] == (1, 96, 55, 55)
    assert out.shape == (1, 1000)


def paper_lrn(a: torch.Tensor, k=2.0, n=5, alpha=1e-4, beta=0.75) -> torch.Tensor:
    """§3.3 written out: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta."""
    N = a.shape[1]
    out = torch.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = (a[:, lo : hi + 1] ** 2).sum(1)
        out[:, i] = a[:, i] / (k + alpha * s) ** beta
    return out


def test_tower_lrn_normalises_within_each_tower(paper_model):
    model = paper_model  # the reference AlexNet with towers=2 and lrn=True
    assert model.spec.towers == 2 and model.spec.lrn
    assert isinstance(model.lrn1, TowerLRN) and isinstance(model.lrn2, TowerLRN)
    assert model.lrn1.towers == 2 and model.lrn2.towers == 2
    torch.manual_seed(0)
    x = torch.randn(2, 96, 5, 5, dtype=torch.float64) * 30  # large enough for LRN to matter
    got = model.lrn1(x)
    half = 48
    per_half = torch.cat([paper_lrn(x[:, :half]), paper_lrn(x[:, half:])], dim=1)
    torch.testing.assert_close(got, per_half, rtol=1e-10, atol=1e-12)
    lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(got, torch.cat([lrn(x[:, :half]), lrn(x[:, half:])], dim=1))
    across = paper_lrn(x)  # LRN over all 96 channels, ignoring the towers
    torch.testing.assert_close(lrn(x), across)
    # Windows of n=5 reach 2 channels across the boundary: channels 46..49 differ ...
    for c in (46, 47, 48, 49):
        assert not torch.allclose(got[:, c], across[:, c]), c
    # ... and every other channel is the same either way.
    keep = [c for c in range(96) if c not in (46, 47, 48, 49)]
    torch.testing.assert_close(got[:, keep], across[:, keep], rtol=1e-10, atol=1e-12)
    # lrn2 of the same model does the same on conv2's 256 channels.
    y = torch.randn(1, 256, 3, 3, dtype=torch.float64) * 30
    torch.testing.assert_close(
        model.lrn2(y), torch.cat([paper_lrn(y[:, :128]), paper_lrn(y[:, 128:])], dim=1), rtol=1e-10, atol=1e-12
    )
