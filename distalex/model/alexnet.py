"""The reference AlexNet: one module, one device, no process or device logic.

``towers = T`` expresses the paper's T-GPU layout (Krizhevsky et al. 2012, §3.5,
Fig. 2) on a single device: conv2, conv4 and conv5 read only their own tower's
maps (grouped convolutions, ``groups=T``) and LRN normalises within a tower.
conv1 sees the whole input; conv3, fc6, fc7 and fc8 read every tower.  Output
channels are laid out tower-major (tower 0's slice first), which is what lets
:mod:`distalex.parallel.towers` map weights to towers one to one.

With the default options (towers 1, width 1, no LRN, 1x224x224 input) this is
d2l's ``nn.Sequential``: same layers, same order, 46,764,746 parameters; with
``dropout_rng="process"`` even the dropout layers are d2l's ``nn.Dropout``, by
default they are :class:`~distalex.model.dropout.KeyedDropout` (the same
arithmetic, masks that do not depend on the placement).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from distalex.errors import ModelSpecError
from distalex.model.dropout import KeyedDropout

# The paper's widths (= d2l's): conv1..conv5 channels, fc6/fc7 units.
PAPER_CONV = (96, 256, 384, 384, 256)
PAPER_FC = 4096
# LRN constants of §3.3.  The paper divides by (k + alpha * sum)^beta; PyTorch
# divides by (k + alpha/n * sum)^beta, so PyTorch's alpha is n * the paper's.
LRN_K, LRN_N, LRN_ALPHA, LRN_BETA = 2.0, 5, 1e-4, 0.75
# Layers whose bias the paper initialises to 1 (§5) - the rest start at 0.
PAPER_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


@dataclass(frozen=True)
class AlexNetSpec:
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 224
    width: float = 1.0
    towers: int = 1
    dropout: float = 0.5
    dropout_rng: str = "placement_invariant"  # or "process": nn.Dropout, each process its own RNG
    lrn: bool = False
    conv1_padding: int = 1

    @property
    def conv_channels(self) -> tuple[int, ...]:
        return tuple(max(1, round(c * self.width)) for c in PAPER_CONV)

    @property
    def fc_units(self) -> int:
        return max(1, round(PAPER_FC * self.width))

    def sides(self, image_size: int | None = None) -> dict[str, int]:
        """The side of every stage's square maps, the one place the network's shape
        arithmetic lives (the flat feature size, the exchanges' tensors and the FLOP
        count all read it): conv1 (11x11/4), then each 3/2 max-pool; conv2-conv5 keep
        the side (5x5 pad 2, 3x3 pad 1).  A stage whose input is smaller than its
        window has side 0, and so has every stage after it."""
        n = self.image_size if image_size is None else image_size
        out = {"conv1": max(0, (n + 2 * self.conv1_padding - 11) // 4 + 1)}
        for pool, before in (("pool1", "conv1"), ("pool2", "pool1"), ("pool5", "pool2")):
            side = out[before]
            out[pool] = (side - 3) // 2 + 1 if side >= 3 else 0
        return out

    def layer_inputs(self) -> dict[str, tuple[int, ...]]:
        """The shape of one example's input to every weight layer (conv1..fc8): what crosses a
        pipeline boundary cut in front of that layer (:mod:`distalex.parallel.pipeline`)."""
        c, sides = self.conv_channels, self.sides()
        maps = sides["pool2"]
        return {
            "conv1": (self.in_channels, self.image_size, self.image_size),
            "conv2": (c[0], sides["pool1"], sides["pool1"]),
            "conv3": (c[1], maps, maps),
            "conv4": (c[2], maps, maps),
            "conv5": (c[3], maps, maps),
            "fc6": (self.flat_features,),
            "fc7": (self.fc_units,),
            "fc8": (self.fc_units,),
        }

    def feature_size(self, image_size: int | None = None) -> int:
        """Side of conv5's pooled maps for a square input (0 if too small)."""
        return self.sides(image_size)["pool5"]

    def smallest_image_size(self) -> int:
        n = 1
        while self.feature_size(n) < 1:
            n += 1
        return n

    @property
    def flat_features(self) -> int:
        return self.conv_channels[4] * self.feature_size() ** 2

    def check(self) -> None:
        if self.feature_size() < 1:
            raise ModelSpecError(
                f"data.image_size={self.image_size} is too small for AlexNet "
                f"(conv1 padding {self.conv1_padding}): the smallest image size that works is "
                f"{self.smallest_image_size()}"
            )
        t = self.towers
        sizes = dict(zip(("conv1", "conv2", "conv3", "conv4", "conv5"), self.conv_channels, strict=True))
        sizes["fc6/fc7"] = self.fc_units
        bad = {k: v for k, v in sizes.items() if v % t}
        if t < 1 or bad:
            raise ModelSpecError(
                f"model.towers={t} must divide every layer's width at model.width={self.width}; "
                f"not divisible: " + ", ".join(f"{k}={v}" for k, v in bad.items())
            )


def local_response_norm(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """``torch.nn.functional.local_response_norm`` for NCHW input: x / (k + alpha/size *
    sum of x^2 over ``size`` neighbouring channels)^beta.  The window sum is ``size``
    shifted slices added up instead of torch's ``avg_pool3d``, whose CUDA backward has
    no deterministic kernel (it would refuse to run under train.deterministic)."""
    c = x.shape[1]
    padded = torch.nn.functional.pad(x * x, (0, 0, 0, 0, size // 2, (size - 1) // 2))
    window = padded[:, :c]
    for i in range(1, size):
        window = window + padded[:, i : i + c]
    return x / (window / size * alpha + k).pow(beta)


class TowerLRN(nn.Module):
    """LRN applied within each tower's channels only (§3.3, §3.5)."""

    def __init__(self, towers: int):
        super().__init__()
        self.towers = towers

    def _lrn(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, LRN_N, alpha=LRN_N * LRN_ALPHA, beta=LRN_BETA, k=LRN_K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.towers == 1:
            return self._lrn(x)
        b, c, h, w = x.shape
        y = self._lrn(x.reshape(b * self.towers, c // self.towers, h, w))
        return y.reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"towers={self.towers}"


def run_layers(module: nn.Module, x: torch.Tensor, first: str, last: str) -> torch.Tensor:
    """Run ``module``'s children from ``first`` to ``last`` (inclusive, in order) on ``x``:
    the stretch of layers between two exchanges of a placed network."""
    on = False
    for name, child in module.named_children():
        on = on or name == first
        if on:
            x = child(x)
        if name == last:
            return x
    raise KeyError(last)


def dropout_layer(spec: AlexNetSpec, layer: int) -> nn.Module:
    """The dropout after fc``layer`` (§4.2: p = 0.5 in the paper): placement-invariant masks
    (:class:`~distalex.model.dropout.KeyedDropout`) unless ``dropout_rng`` is ``process``."""
    if spec.dropout_rng == "process":
        return nn.Dropout(spec.dropout)
    return KeyedDropout(spec.dropout, layer, spec.fc_units)


def build_layers(spec: AlexNetSpec, towers_in_module: int, groups: int) -> OrderedDict[str, nn.Module]:
    """The layer list shared by the reference (groups=T) and one tower (groups=1).

    ``towers_in_module`` divides the widths: T for one tower of the tower-parallel
    model, 1 for the reference.  conv3/fc6/fc7/fc8 inputs always span all towers.
    """
    spec.check()
    c1, c2, c3, c4, c5 = (c // towers_in_module for c in spec.conv_channels)
    fc = spec.fc_units // towers_in_module
    full = spec.conv_channels
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv1"] = nn.Conv2d(spec.in_channels, c1, 11, stride=4, padding=spec.conv1_padding)
    layers["relu1"] = nn.ReLU()
    if spec.lrn:
        layers["lrn1"] = TowerLRN(groups)
    layers["pool1"] = nn.MaxPool2d(3, stride=2)
    # conv2 reads only its own tower's conv1 maps.
    layers["conv2"] = nn.Conv2d(c1, c2, 5, padding=2, groups=groups)
    layers["relu2"] = nn.ReLU()
    if spec.lrn:
        layers["lrn2"] = TowerLRN(groups)
    layers["pool2"] = nn.MaxPool2d(3, stride=2)
    # conv3 reads every tower's conv2 maps (first cross-tower point).
    layers["conv3"] = nn.Conv2d(full[1], c3, 3, padding=1)
    layers["relu3"] = nn.ReLU()
    layers["conv4"] = nn.Conv2d(c3, c4, 3, padding=1, groups=groups)
    layers["relu4"] = nn.ReLU()
    layers["conv5"] = nn.Conv2d(c4, c5, 3, padding=1, groups=groups)
    layers["relu5"] = nn.ReLU()
    layers["pool5"] = nn.MaxPool2d(3, stride=2)
    layers["flatten"] = nn.Flatten()
    layers["fc6"] = nn.Linear(spec.flat_features, fc)  # reads all towers' conv5 features
    layers["relu6"] = nn.ReLU()
    layers["drop6"] = dropout_layer(spec, 6)
    layers["fc7"] = nn.Linear(spec.fc_units, fc)  # reads all fc6 units
    layers["relu7"] = nn.ReLU()
    layers["drop7"] = dropout_layer(spec, 7)
    return layers


class AlexNet(nn.Sequential):
    """Reference AlexNet; ``towers`` become grouped convs and per-tower LRN."""

    def __init__(self, spec: AlexNetSpec):
        layers = build_layers(spec, towers_in_module=1, groups=spec.towers)
        layers["fc8"] = nn.Linear(spec.fc_units, spec.num_classes)  # reads all fc7 units
        super().__init__(layers)
        self.spec = spec


def init_weights(model: nn.Module, scheme: str) -> None:
    """``xavier``: d2l's train_ch6 (weights only, biases keep PyTorch's default).
    ``paper``: §5, weights N(0, 0.01); biases 1 in conv2/4/5, fc6/7, else 0."""
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        elif scheme == "paper":
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.constant_(module.bias, 1.0 if name.split(".")[-1] in PAPER_BIAS_ONE else 0.0)
        else:
            raise ModelSpecError(f"config key 'model.init': unknown init scheme {scheme!r} (xavier or paper)")


def spec_from_config(cfg) -> AlexNetSpec:
    m = cfg.model
    return AlexNetSpec(
        in_channels=m.in_channels,
        num_classes=m.num_classes,
        image_size=cfg.data.image_size,
        width=m.width,
        towers=m.towers,
        dropout=m.dropout,
        dropout_rng=m.dropout_rng,
        lrn=m.lrn,
        conv1_padding=m.conv1_padding,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
