"""train.deterministic: what it sets, that it is set before CUDA starts, and that the
network uses no op without a deterministic CUDA kernel (which would raise under it)."""

import os

import pytest
import torch
import torch.nn.functional as F

from distalex.config import load_config
from distalex.model.alexnet import AlexNet, AlexNetSpec, TowerLRN, local_response_norm
from distalex.runtime import determinism


@pytest.fixture
def restore_torch_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(was[0])
    torch.backends.cudnn.benchmark = was[1]


def test_deterministic_sets_every_switch(restore_torch_flags, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    determinism.configure(deterministic=True, cudnn_benchmark=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is False  # deterministic wins over cudnn_benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert determinism.describe() == {"deterministic": True, "cudnn_benchmark": False}


def test_a_users_cublas_workspace_setting_is_kept(restore_torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    determinism.configure(deterministic=True, cudnn_benchmark=False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_without_deterministic_cudnn_benchmark_follows_the_config_on_gpus(restore_torch_flags, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    determinism.configure(deterministic=False, cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    determinism.configure(deterministic=False, cudnn_benchmark=False)
    assert not torch.backends.cudnn.benchmark
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_make_accelerator_configures_before_the_process_state_touches_the_device(restore_torch_flags, monkeypatch):
    import accelerate

    from distalex.parallel import launch
    from distalex.parallel.ddp import DDPOptions

    seen = {}

    class FakeState:
        def __init__(self, cpu=False, **kwargs):
            seen["env"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
            seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
            self.device = torch.device("cpu")

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: None)
    cfg = load_config(None, ["train.deterministic=true"])
    launch.make_accelerator(cfg.train, DDPOptions(), launch.group_timeout(cfg.train))
    assert seen == {"env": ":4096:8", "deterministic": True}


@pytest.mark.parametrize("shape", [(2, 6, 4, 4), (3, 5, 1, 1), (1, 2, 3, 3)])
def test_local_response_norm_equals_torchs(shape):
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 20).requires_grad_()
    args = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)
    ours, theirs = local_response_norm(x, **args), F.local_response_norm(x, **args)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(ours)
    (ga,) = torch.autograd.grad(ours, x, g)
    (gb,) = torch.autograd.grad(theirs, x, g)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-14)


# Ops of the paper's network that torch documents as having no deterministic CUDA kernel
# (torch.use_deterministic_algorithms would raise on them): none may appear in its graph.
NO_DETERMINISTIC_CUDA_BACKWARD = {
    "AvgPool3DBackward0",  # what F.local_response_norm uses
    "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0",
    "MaxPool3DWithIndicesBackward0",
    "UpsampleBilinear2DBackward0",
    "CumsumBackward0",
    "NllLoss2DBackward0",
}


def graph_ops(t: torch.Tensor) -> set:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_the_network_with_lrn_has_only_ops_with_deterministic_cuda_kernels():
    torch.manual_seed(0)
    net = AlexNet(AlexNetSpec(towers=2, width=0.125, image_size=67, lrn=True))
    assert isinstance(net.lrn1, TowerLRN)
    loss = F.cross_entropy(net(torch.randn(2, 1, 67, 67)), torch.tensor([1, 2]))
    ops = graph_ops(loss)
    assert "ConvolutionBackward0" in ops and "NllLossBackward0" in ops  # the walk sees the whole net
    assert not ops & NO_DETERMINISTIC_CUDA_BACKWARD, ops & NO_DETERMINISTIC_CUDA_BACKWARD
