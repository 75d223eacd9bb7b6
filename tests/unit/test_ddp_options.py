"""ddp.* as DDP takes it (distalex/parallel/ddp.py DDPOptions): accelerate's kwargs, the
one-bucket rule of PowerSGD over gloo.  The numerical effect of each hook is tested
in tests/distributed/test_comm_hooks.py."""

import pytest
from accelerate.utils import DDPCommunicationHookType

from distalex.config import ConfigError, load_config
from distalex.model.alexnet import spec_from_config
from distalex.model.flops import layer_counts
from distalex.parallel.ddp import DDPOptions


def options(*overrides, gloo=True):
    cfg = load_config(None, list(overrides))
    return DDPOptions.from_config(cfg.ddp, spec_from_config(cfg), gloo=gloo)


def test_defaults_leave_ddp_as_pytorch_makes_it():
    opts = options()
    assert opts.comm_hook == "none" and opts.ddp_kwargs() == {"gradient_as_bucket_view": False}
    kwargs = opts.accelerate_kwargs()
    assert kwargs.to_kwargs() == {} and kwargs.comm_hook == DDPCommunicationHookType.NO


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ("bf16", DDPCommunicationHookType.BF16),
        ("fp16", DDPCommunicationHookType.FP16),
        ("powersgd", DDPCommunicationHookType.POWER_SGD),
    ],
)
def test_hooks_map_to_accelerate(hook, expected):
    kwargs = options(f"ddp.comm_hook={hook}", "ddp.powersgd_rank=4", "ddp.powersgd_start_iter=7").accelerate_kwargs()
    assert kwargs.comm_hook == expected
    if hook == "powersgd":
        assert kwargs.comm_state_option == {"matrix_approximation_rank": 4, "start_powerSGD_iter": 7}


def test_bucket_and_view_options_reach_ddp():
    opts = options("ddp.bucket_cap_mb=50", "ddp.gradient_as_bucket_view=true", gloo=False)
    assert opts.ddp_kwargs() == {"bucket_cap_mb": 50, "gradient_as_bucket_view": True}
    assert opts.accelerate_kwargs().to_kwargs() == {"bucket_cap_mb": 50, "gradient_as_bucket_view": True}


def test_powersgd_over_gloo_gets_one_bucket():
    cfg = load_config(None, ["ddp.comm_hook=powersgd"])
    grads_mb = sum(layer.params for layer in layer_counts(spec_from_config(cfg))) * 4 / 2**20
    opts = DDPOptions.from_config(cfg.ddp, spec_from_config(cfg), gloo=True)
    assert opts.bucket_cap_mb >= grads_mb
    assert (
        DDPOptions.from_config(cfg.ddp, spec_from_config(cfg), gloo=False).bucket_cap_mb is None
    )  # NCCL: DDP's buckets


def test_powersgd_over_gloo_refuses_a_small_bucket_with_the_numbers():
    with pytest.raises(ConfigError) as err:
        options("ddp.comm_hook=powersgd", "ddp.bucket_cap_mb=25")
    msg = str(err.value)
    params = 46_764_746  # the d2l network (distalex/model/alexnet.py)
    assert f"{params * 4 / 2**20:.1f} MiB" in msg
    assert "ddp.bucket_cap_mb" in msg and "25" in msg and "\n" not in msg


def test_bytes_per_step_follow_the_hook():
    from torch import nn

    from distalex.parallel.comm import ddp_bytes_per_step
    from distalex.parallel.ddp import DDPOptions

    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 2))  # weights 50x100 and 2x50, biases 50 and 2
    elements = 5000 + 50 + 100 + 2
    assert DDPOptions().bytes_per_step(model.parameters(), 2) == ddp_bytes_per_step(elements, 2) == 4 * elements
    assert DDPOptions("bf16").bytes_per_step(model.parameters(), 4) == ddp_bytes_per_step(elements, 4, element_size=2)
    # PowerSGD rank 1: 50x100 -> P 50 + Q 100; 2x50 is not worth it ((2+50)*2 > 100): whole; biases whole.
    assert DDPOptions("powersgd", powersgd_rank=1).bytes_per_step(model.parameters(), 2) == 4 * (150 + 100 + 50 + 2)
    # rank 30: (50+100)*30*2 > 5000, so nothing is compressed.
    assert DDPOptions("powersgd", powersgd_rank=30).bytes_per_step(model.parameters(), 2) == 4 * elements
