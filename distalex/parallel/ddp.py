"""How DDP exchanges gradients: the wrapper's keywords and a communication hook, from ``cfg.ddp``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distalex.config import DDPConfig
from distalex.errors import ConfigError
from distalex.model.alexnet import AlexNetSpec
from distalex.model.flops import layer_counts
from distalex.parallel.comm import ddp_bytes_per_step


@dataclass(frozen=True)
class DDPOptions:
    """``cfg.ddp`` as DDP takes it: the wrapper's keywords and a communication hook.

    The hooks are PyTorch's (``torch.distributed.algorithms.ddp_comm_hooks``):
    bf16/fp16 round each gradient bucket to 16 bits for the all-reduce and back;
    PowerSGD all-reduces a rank-r factorisation of each gradient matrix, keeping
    what it drops as error feedback for the next step.
    """

    comm_hook: str = "none"
    bucket_cap_mb: float | None = None
    gradient_as_bucket_view: bool = False
    powersgd_rank: int = 1
    powersgd_start_iter: int = 1000

    @staticmethod
    def from_config(g: DDPConfig, spec: AlexNetSpec, gloo: bool) -> DDPOptions:
        """Validated against the network: PowerSGD over gloo needs every gradient in one
        bucket.  Its hook chains collectives from completion callbacks, and with several
        buckets two ranks can issue them in different orders, which gloo cannot match
        (seen here as a size-mismatch abort in about one run in five)."""
        cap = g.bucket_cap_mb
        if g.comm_hook == "powersgd" and gloo:
            grads_mb = sum(layer.params for layer in layer_counts(spec)) * 4 / 2**20
            if cap is None:
                cap = float(math.ceil(grads_mb) + 1)
            elif cap < grads_mb:
                raise ConfigError(
                    f"config key 'ddp.bucket_cap_mb': ddp.comm_hook=powersgd over gloo needs one gradient "
                    f"bucket, but {cap} MiB holds less than the {grads_mb:.1f} MiB of gradients; unset it "
                    f"or set it >= {math.ceil(grads_mb)}"
                )
        return DDPOptions(g.comm_hook, cap, g.gradient_as_bucket_view, g.powersgd_rank, g.powersgd_start_iter)

    def bytes_per_step(self, params, replicas: int) -> int:
        """Bytes one replica sends per step in DDP's all-reduce of ``params`` (ring accounting), with
        this hook: 4 per gradient element, 2 with bf16/fp16; PowerSGD once it compresses
        (from ``powersgd_start_iter``): its P and Q factors, and the tensors it leaves whole."""
        shapes = [p.shape for p in params if p.requires_grad]
        if self.comm_hook in ("bf16", "fp16"):
            return ddp_bytes_per_step(sum(s.numel() for s in shapes), replicas, element_size=2)
        if self.comm_hook != "powersgd":
            return ddp_bytes_per_step(sum(s.numel() for s in shapes), replicas)
        sent = 0
        for shape in shapes:
            n = shape[0] if len(shape) else 1
            m = shape.numel() // n
            rank = min(n, m, self.powersgd_rank)
            # PyTorch's rule (min_compression_rate 2): compress when it at least halves the tensor.
            sent += (n + m) * rank if (n + m) * rank * 2 < n * m else n * m
        return ddp_bytes_per_step(sent, replicas)

    def ddp_kwargs(self) -> dict:
        out = {"gradient_as_bucket_view": self.gradient_as_bucket_view}
        if self.bucket_cap_mb is not None:
            out["bucket_cap_mb"] = self.bucket_cap_mb
        return out

    def _powersgd_options(self) -> dict:
        return {"matrix_approximation_rank": self.powersgd_rank, "start_powerSGD_iter": self.powersgd_start_iter}

    def register_hook(self, ddp_model, group) -> None:
        """Register the hook on a DDP model whose replicas are ``group``."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        if self.comm_hook == "bf16":
            ddp_model.register_comm_hook(group, default_hooks.bf16_compress_hook)
        elif self.comm_hook == "fp16":
            ddp_model.register_comm_hook(group, default_hooks.fp16_compress_hook)
        elif self.comm_hook == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=group, **self._powersgd_options())
            ddp_model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)

    def accelerate_kwargs(self):
        """The same for accelerate's prepare (DDP over every rank)."""
        from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

        hooks = {
            "none": DDPCommunicationHookType.NO,
            "bf16": DDPCommunicationHookType.BF16,
            "fp16": DDPCommunicationHookType.FP16,
            "powersgd": DDPCommunicationHookType.POWER_SGD,
        }
        kwargs = DistributedDataParallelKwargs(
            gradient_as_bucket_view=self.gradient_as_bucket_view,
            comm_hook=hooks[self.comm_hook],
            comm_state_option=self._powersgd_options() if self.comm_hook == "powersgd" else {},
        )
        if self.bucket_cap_mb is not None:
            kwargs.bucket_cap_mb = self.bucket_cap_mb
        return kwargs
