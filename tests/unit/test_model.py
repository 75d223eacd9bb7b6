import pytest
import torch
from torch import nn

from distalex.model.alexnet import AlexNet, AlexNetSpec, ModelSpecError, TowerLRN, count_parameters, init_weights
from distalex.model.dropout import KeyedDropout


def d2l_net():
    """The d2l network, verbatim from d2l's AlexNet chapter."""
    return nn.Sequential(
        nn.Conv2d(1, 96, kernel_size=11, stride=4, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(6400, 4096),
        nn.ReLU(),
        nn.Dropout(p=0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(p=0.5),
        nn.Linear(4096, 10),
    )


def test_default_preset_is_the_d2l_network():
    """With d2l's per-process dropout the default preset is the chapter's network layer for
    layer; the default placement-invariant dropout sits where d2l's dropout layers are."""
    ours, d2l = AlexNet(AlexNetSpec(dropout_rng="process")), d2l_net()
    assert count_parameters(ours) == count_parameters(d2l) == 46_764_746
    assert [type(m) for m in ours] == [type(m) for m in d2l]
    keyed = [type(m) for m in AlexNet(AlexNetSpec())]
    assert [t is KeyedDropout for t in keyed] == [t is nn.Dropout for t in map(type, d2l)]
    x = torch.randn(1, 1, 224, 224)
    a = b = x
    for mine, theirs in zip(ours, d2l, strict=True):
        a, b = mine(a), theirs(b)
        assert a.shape == b.shape, (mine, a.shape, b.shape)
    assert a.shape == (1, 10)
    # Same parameters in the same order: weights copy over one to one.
    d2l.load_state_dict(dict(zip(d2l.state_dict().keys(), ours.state_dict().values(), strict=True)))
    ours.eval(), d2l.eval()
    assert torch.equal(ours(x), d2l(x))


def test_two_towers_group_own_tower_layers_only():
    net = AlexNet(AlexNetSpec(towers=2))
    groups = {name: m.groups for name, m in net.named_children() if isinstance(m, nn.Conv2d)}
    # conv1 sees the whole input, conv3 reads every tower; conv2/4/5 stay in their tower.
    assert groups == {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
    assert net.conv2.weight.shape == (256, 48, 5, 5)
    assert net.conv4.weight.shape == (384, 192, 3, 3)
    assert net.fc6.weight.shape == (4096, 6400) and net.fc8.weight.shape == (10, 4096)
    # Grouped convs halve those layers' weights.
    expected = 46_764_746 - (256 * 96 * 25 + 384 * 384 * 9 + 256 * 384 * 9) // 2
    assert count_parameters(net) == expected


def test_grouped_conv2_does_not_mix_towers():
    net = AlexNet(AlexNetSpec(towers=2, width=0.125, image_size=67))
    x = torch.randn(2, 12, 7, 7)
    y = net.conv2(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0  # perturb tower 1's input maps only
    y2 = net.conv2(x2)
    assert torch.equal(y[:, :16], y2[:, :16])  # tower 0's outputs untouched
    assert not torch.equal(y[:, 16:], y2[:, 16:])


def test_flatten_size_follows_image_size():
    net = AlexNet(AlexNetSpec(image_size=96))
    assert net(torch.randn(2, 1, 96, 96)).shape == (2, 10)
    assert net.fc6.in_features == 256 * 1 * 1


def test_too_small_image_names_smallest_size():
    with pytest.raises(ModelSpecError, match="smallest image size that works is 65"):
        AlexNet(AlexNetSpec(image_size=64))
    AlexNet(AlexNetSpec(image_size=65, width=0.125))


def test_towers_must_divide_widths():
    with pytest.raises(ModelSpecError, match="model.towers=5"):
        AlexNet(AlexNetSpec(towers=5))


def test_lrn_is_per_tower():
    lrn = TowerLRN(2)
    x = torch.rand(2, 8, 5, 5) + 1
    halves = torch.cat([nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0)(h) for h in x.chunk(2, 1)], 1)
    assert torch.allclose(lrn(x), halves)


def test_init_schemes():
    torch.manual_seed(0)
    net = AlexNet(AlexNetSpec(width=0.25, image_size=67))
    init_weights(net, "paper")
    assert abs(net.fc6.weight.std().item() - 0.01) < 1e-3
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.all(getattr(net, name).bias == 1)
    for name in ("conv1", "conv3", "fc8"):
        assert torch.all(getattr(net, name).bias == 0)
    init_weights(net, "xavier")
    bound = (6 / (net.fc7.in_features + net.fc7.out_features)) ** 0.5
    assert net.fc7.weight.abs().max() <= bound and net.fc7.weight.abs().max() > 0.9 * bound
