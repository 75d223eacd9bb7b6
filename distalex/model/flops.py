"""Arithmetic of the network: multiply-accumulates per layer, from the spec alone.

Counted: the multiply-accumulates (MACs) of every convolution and fully connected
layer, from their shapes (grouped convolutions of the towers included: a kernel
of a grouped layer reads only its own tower's ``in/T`` channels).  One MAC is 2
floating-point operations.  Not counted: biases, ReLU, pooling, LRN, dropout,
the loss and the optimizer -- together well under 1 % of the total for every
AlexNet this package builds; this is the usual convention of model-FLOPs
utilisation, which counts the matrix arithmetic only.

Training FLOPs per example = 3 x forward FLOPs: the backward pass computes a
gradient for the layer's input and one for its weights, each as many MACs as
the forward.  (This counts conv1's input gradient too, which nobody needs and
PyTorch skips: 3.6 % of the d2l network's forward, 1.2 % of its training
FLOPs.  The convention keeps the figure comparable with other frameworks'.)

The count depends only on :class:`~distalex.model.alexnet.AlexNetSpec`: the same for
every placement (model-parallel towers split the work, they do not repeat it).
"""

from __future__ import annotations

from dataclasses import dataclass

from distalex.model.alexnet import AlexNetSpec

TRAINING_PASSES = 3  # forward + backward (input gradient + weight gradient)


@dataclass(frozen=True)
class LayerCount:
    name: str
    output: tuple[int, ...]  # (channels, height, width) or (units,)
    macs: int  # per example, forward
    params: int  # weights and biases


def layer_counts(spec: AlexNetSpec) -> list[LayerCount]:
    """Per layer, for one example of ``spec.image_size`` x ``spec.image_size``: output, MACs, parameters."""
    spec.check()
    t = spec.towers
    c1, c2, c3, c4, c5 = spec.conv_channels
    fc = spec.fc_units
    sides = spec.sides()
    n1, n2, n3, n5 = sides["conv1"], sides["pool1"], sides["pool2"], sides["pool5"]
    convs = [  # name, in channels seen by one kernel, out channels, kernel, output side
        ("conv1", spec.in_channels, c1, 11, n1),
        ("conv2", c1 // t, c2, 5, n2),  # grouped: own tower's conv1 maps
        ("conv3", c2, c3, 3, n3),  # reads every tower
        ("conv4", c3 // t, c4, 3, n3),
        ("conv5", c4 // t, c5, 3, n3),
    ]
    out = [
        LayerCount(name, (cout, side, side), cout * side * side * cin * k * k, cout * cin * k * k + cout)
        for name, cin, cout, k, side in convs
    ]
    for name, fan_in, units in (("fc6", c5 * n5 * n5, fc), ("fc7", fc, fc), ("fc8", fc, spec.num_classes)):
        out.append(LayerCount(name, (units,), fan_in * units, fan_in * units + units))
    return out


def forward_macs(spec: AlexNetSpec) -> int:
    return sum(layer.macs for layer in layer_counts(spec))


def forward_flops(spec: AlexNetSpec) -> int:
    """FLOPs of one example's forward pass (2 per MAC)."""
    return 2 * forward_macs(spec)


def training_flops(spec: AlexNetSpec) -> int:
    """FLOPs of one example's training step: forward + backward = 3 x forward."""
    return TRAINING_PASSES * forward_flops(spec)
