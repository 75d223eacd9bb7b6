"""The network's arithmetic (distalex/model/flops.py) against docs/imagenet.md's per-layer table
and against an independent count: PyTorch's FlopCounterMode on the reference model."""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distalex.model.alexnet import AlexNet, AlexNetSpec, count_parameters
from distalex.model.flops import TRAINING_PASSES, forward_flops, forward_macs, layer_counts, training_flops

from helpers import PAPER, ROOT

D2L = AlexNetSpec()  # the d2l network: 1x224x224, towers 1, conv1 padding 1
PAPER_NET = AlexNetSpec(in_channels=3, num_classes=1000, towers=2, lrn=True, conv1_padding=2)
SPECS = {
    "d2l": D2L,
    "paper": PAPER_NET,
    "tiny": AlexNetSpec(width=0.125, image_size=67),
    "towers4": AlexNetSpec(width=0.5, towers=4, image_size=99, lrn=True),
    "wide-rgb": AlexNetSpec(in_channels=3, width=1.5, image_size=131, num_classes=7),
}


def counted_flops(spec: AlexNetSpec, backward: bool) -> int:
    """FLOPs of one example that FlopCounterMode sees on the reference model."""
    torch.manual_seed(0)
    model = AlexNet(spec)
    x = torch.randn(1, spec.in_channels, spec.image_size, spec.image_size)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def readme_table() -> dict:
    """docs/imagenet.md's per-layer table of the 2012 network: layer -> (output, MACs in M, params in M)."""
    rows = {}
    for line in (ROOT / "docs" / "imagenet.md").read_text().splitlines():
        m = re.match(r"\| (conv\d|fc\d) [^|]*\| ([\d×]+) \| ([\d.]+) M \| ([\d.]+) M \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), float(m.group(3)), float(m.group(4)))
        m = re.match(r"\| \*\*total\*\* \| \| \*\*(\d+) M MACs = ([\d.]+) GFLOP\*\* \| \*\*([\d.]+) M\*\* \|", line)
        if m:
            rows["total"] = (int(m.group(1)), float(m.group(2)), float(m.group(3)))
    return rows


def test_the_paper_config_is_the_network_of_the_readme_table():
    from distalex.config import load_config
    from distalex.model.alexnet import spec_from_config

    assert spec_from_config(load_config(PAPER)) == PAPER_NET


def test_paper_network_matches_the_readme_table():
    table = readme_table()
    assert set(table) == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8", "total"}
    for layer in layer_counts(PAPER_NET):
        output, macs_m, params_m = table[layer.name]
        assert output == "×".join(map(str, layer.output)), layer.name
        assert round(layer.macs / 1e6, 1) == macs_m, layer.name
        assert round(layer.params / 1e6, 2) == params_m, layer.name
    total_macs_m, gflop, params_m = table["total"]
    assert round(forward_macs(PAPER_NET) / 1e6) == total_macs_m
    assert round(forward_flops(PAPER_NET) / 1e9, 2) == gflop
    assert round(sum(layer.params for layer in layer_counts(PAPER_NET)) / 1e6, 1) == params_m


def test_d2l_network_costs_5_6_gflop_per_training_example():
    """The figure the README and the benchmark quote for the d2l network at 224."""
    assert round(training_flops(D2L) / 1e9, 1) == 5.6
    assert training_flops(D2L) == TRAINING_PASSES * 2 * forward_macs(D2L)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_forward_count_equals_flop_counter(name):
    spec = SPECS[name]
    assert forward_flops(spec) == counted_flops(spec, backward=False)


@pytest.mark.parametrize("name", ["d2l", "tiny", "wide-rgb"])
def test_training_count_is_three_forwards(name):
    """FlopCounterMode counts backward op by op.  It skips conv1's input gradient
    (the images need none), which the 3 x forward convention includes.  (Grouped
    convolutions are left out: the counter counts their weight gradient as if the
    convolution were not grouped.)"""
    spec = SPECS[name]
    conv1 = layer_counts(spec)[0]
    assert conv1.name == "conv1"
    assert training_flops(spec) - 2 * conv1.macs == counted_flops(spec, backward=True)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_parameter_counts_equal_the_model(name):
    spec = SPECS[name]
    assert sum(layer.params for layer in layer_counts(spec)) == count_parameters(AlexNet(spec))
