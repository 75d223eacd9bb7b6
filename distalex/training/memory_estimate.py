"""Will the run fit in memory?  A lower bound of what one training step holds, from the
config and the network's spec alone, compared with the machine's (or the device's) memory
before anything is allocated or written.

The figures are a *floor*, each term counted at its least, so a config that is refused
cannot fit and a config that fits is never refused (the real peak is higher: autograd keeps
more than one tensor per layer, the allocators keep slack):

* model state: fp32 weights + their gradients (+ the SGD momentum buffers when
  ``optim.momentum > 0``), split over the processes where the placement splits the model
  (towers, fc shards, pipeline stages, FSDP shards: the model's share ``1 / world``);
* activations: the output of every weight layer and pooling stage (one fp32 value each, what
  the backward pass must keep) and the input batch, for the rows a process computes at once
  (its replica's share of the global batch; in a pipeline, one micro-batch);
* loaders: ImageFolder decodes every image and resizes its shorter side to
  ``data.resize_size`` (3 bytes per pixel, at least ``resize_size**2`` pixels) -- one image
  in each DataLoader worker at a time -- and keeps ``prefetch`` collated batches
  (fp32 crops) per worker in flight; Fashion-MNIST and the synthetic set keep their uint8
  images on the device.

On a CPU every local process's model, activations and loaders share the host's memory; on a
GPU the model and activations go to the device's memory and only the loaders to the host's.
"""

from __future__ import annotations

from dataclasses import dataclass

from distalex.errors import ConfigError
from distalex.model.flops import layer_counts

FLOAT = 4  # bytes of an fp32 value
PREFETCH = 2  # DataLoader's default prefetch_factor (batches in flight per worker)
SHARDED = ("model-parallel", "hybrid", "pipeline", "fsdp")  # placements that split the model
SIDE = 28  # Fashion-MNIST's and the synthetic set's stored images: 28 x 28, uint8, kept on the device


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process (model state, activations, in-memory data) and loaders per process."""

    state: int
    activations: int
    data: int
    loaders: int
    processes: int  # processes of this run on this machine (they share its memory)
    device: str  # "cpu" or "cuda"
    keys: str  # the config values the figures grow with, for the message

    @property
    def on_device(self) -> int:
        """What one process puts into its device's memory (the host's, on a CPU)."""
        return self.state + self.activations + self.data

    @property
    def on_host(self) -> int:
        """What the run's processes on this machine put into host memory."""
        per_process = self.loaders + (self.on_device if self.device == "cpu" else 0)
        return self.processes * per_process

    def parts(self) -> str:
        return (
            f"per process: weights, gradients and optimizer state {gib(self.state)}, activations "
            f"{gib(self.activations)}, data {gib(self.data)}, loader buffers {gib(self.loaders)}"
        )


def gib(n: float) -> str:
    x = n / 2**30
    return f"{x:,.0f} GiB" if x >= 100 else f"{x:.3g} GiB"


def estimate(cfg, spec, world_size: int, replicas: int, device: str, processes: int) -> MemoryEstimate:
    """The lower bound for ``cfg`` with ``spec`` on ``world_size`` processes in ``replicas``
    data-parallel copies, ``processes`` of them on this machine, on ``device`` ("cpu" or "cuda")."""
    d, t = cfg.data, cfg.train
    layers = layer_counts(spec)
    params = sum(layer.params for layer in layers)
    copies = 2 + (1 if cfg.optim.momentum > 0 else 0)  # weights, gradients, momentum
    share = world_size if cfg.split_mode in SHARDED else 1
    state = params * copies * FLOAT // share
    sides = spec.sides()
    c1, c2, _, _, c5 = spec.conv_channels
    pools = c1 * sides["pool1"] ** 2 + c2 * sides["pool2"] ** 2 + c5 * sides["pool5"] ** 2
    per_example = sum(_elements(layer.output) for layer in layers) + pools
    per_example += spec.in_channels * spec.image_size**2  # the input batch
    rows = max(1, t.batch_size // max(replicas, 1))
    procs_per_replica = max(1, world_size // max(replicas, 1))
    if cfg.split_mode == "pipeline":
        rows = max(1, rows // max(cfg.pipeline.microbatches, 1))
    activations = rows * per_example * FLOAT // procs_per_replica
    data = loaders = 0
    if d.name == "imagefolder":
        workers = max(d.num_workers, 1)
        decoded = 3 * d.resize_size**2  # one image at its resized size, uint8 RGB
        batch = rows * 3 * d.image_size**2 * FLOAT
        loaders = workers * decoded + (workers * PREFETCH if d.num_workers else 1) * batch
    else:
        train, test = (60000, 10000) if d.name == "fashion_mnist" else (d.synthetic_train_size, d.synthetic_test_size)
        n = min(train, d.train_limit or train) + min(test, d.test_limit or test)
        data = n * spec.in_channels * SIDE * SIDE
    keys = f"data.image_size={d.image_size}, train.batch_size={t.batch_size}, model.width={spec.width}"
    if d.name == "imagefolder":
        keys += f", data.resize_size={d.resize_size}, data.num_workers={d.num_workers}"
    return MemoryEstimate(state, activations, data, loaders, processes, device, keys)


def _elements(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def check_fits(est: MemoryEstimate, host_bytes: int, device_bytes: int | None = None) -> None:
    """Refuse (one ConfigError line with the numbers) a run whose lower bound exceeds the
    host's memory (``host_bytes``, shared by the local processes) or, on a GPU, one device's
    (``device_bytes``)."""
    where = f"{est.processes} process{'es' if est.processes != 1 else ''}"
    where += " needs" if est.processes == 1 else " need"
    if est.device != "cpu" and device_bytes is not None and est.on_device > device_bytes:
        raise ConfigError(
            f"the run cannot fit in GPU memory ({est.keys}): one process needs at least {gib(est.on_device)} "
            f"({est.parts()}), the device has {gib(device_bytes)}; lower train.batch_size, "
            f"data.image_size or model.width, or use more processes"
        )
    if est.on_host > host_bytes:
        raise ConfigError(
            f"the run cannot fit in this machine's memory ({est.keys}): {where} at least {gib(est.on_host)} "
            f"({est.parts()}), the machine allows {gib(host_bytes)}; lower train.batch_size, "
            f"data.image_size, data.resize_size, data.num_workers or model.width"
        )
