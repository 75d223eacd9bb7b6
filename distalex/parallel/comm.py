"""Bytes on the wire: every formula once, and the counter the exchanges fill as they run.

Ring accounting (what each process sends; docs/design.md, "Communication"):

* all-gather of W parts of ``n`` elements each: every process sends (W-1) parts;
* reduce-scatter to W parts of ``n`` elements each: every process sends (W-1) parts;
* all-reduce of ``n`` elements: a reduce-scatter then an all-gather of n/W each,
  2(W-1)/W * n.

The placements count the bytes of their exchanges with these formulas while
they run (:class:`CommStats`); the per-step figures below compute the same from
the shapes alone, which the tests compare.
"""

from __future__ import annotations

import math

import torch

from distalex.model.alexnet import AlexNetSpec


def all_gather_bytes(part_elements: int, parts: int, element_size: int = 4) -> int:
    return (parts - 1) * part_elements * element_size


def reduce_scatter_bytes(part_elements: int, parts: int, element_size: int = 4) -> int:
    return (parts - 1) * part_elements * element_size


def all_reduce_bytes(elements: int, parts: int, element_size: int = 4) -> int:
    return 2 * (parts - 1) * elements * element_size // parts


class CommStats:
    """Bytes this process sent in its exchanges since the last :meth:`pop`."""

    def __init__(self) -> None:
        self.bytes_sent = 0

    def count(self, n: int) -> None:
        # Not while torch.compile traces: a Python counter would be a guard that
        # changes every step and forces a recompile each time.
        if not torch.compiler.is_compiling():
            self.bytes_sent += n

    def pop(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent


def ddp_bytes_per_step(num_params: int, replicas: int, element_size: int = 4) -> int:
    """Bytes one replica sends in DDP's all-reduce of ``num_params`` gradients."""
    return all_reduce_bytes(num_params, replicas, element_size)


def tower_bytes_per_step(spec: AlexNetSpec, local_batch: int, element_size: int = 4) -> dict[str, int]:
    """Bytes one tower sends in one training step (forward + backward), by layer.
    conv3, fc6, fc7: the input all-gathered forward, its gradient all-reduced backward;
    fc8: the partial logits all-reduced forward (its backward is the identity)."""
    t = spec.towers
    c = spec.conv_channels
    sides = spec.sides()
    gathered = {  # elements of the whole gathered tensor
        "conv3": local_batch * c[1] * sides["pool2"] ** 2,
        "fc6": local_batch * spec.flat_features,
        "fc7": local_batch * spec.fc_units,
    }
    out = {
        layer: all_gather_bytes(n // t, t, element_size) + all_reduce_bytes(n, t, element_size)
        for layer, n in gathered.items()
    }
    out["fc8"] = all_reduce_bytes(local_batch * spec.num_classes, t, element_size)
    return out


def input_share_bytes(rows: int, row_bytes: int, members: int) -> int:
    """Bytes one process sends when the ``members`` processes of a replica share the decoding
    of a batch of ``rows``: its equal share (padded, ``ceil(rows / members)`` rows of
    ``row_bytes`` uint8 bytes) all-gathered (distalex/data/pixels.py)."""
    return all_gather_bytes(-(-rows // members) * row_bytes, members, 1)


def input_bytes_per_step(local_batch: int, image_size: int, members: int, extra_row_bytes: int = 20) -> int:
    """Bytes one tower sends per training step to share its replica's decoded batch: each row a
    uint8 3 x S x S crop plus its lighting shift (3 float32) and label (int64)."""
    return input_share_bytes(local_batch, 3 * image_size * image_size + extra_row_bytes, members)


def hybrid_bytes_per_step(spec: AlexNetSpec, world: int, global_batch: int, element_size: int = 4) -> dict[str, int]:
    """Bytes one rank sends in one training step of the hybrid exchanges (forward + backward):
    each moves a tensor of this rank's rows forward and the same amount back (the adjoint
    collective: an all-gather's is a reduce-scatter and the reverse)."""
    rows = global_batch // world  # this rank's rows
    parts = {
        "fc6_input": rows * spec.flat_features,  # conv5 features, all-gathered by rows
        "fc7_input": rows * spec.fc_units,  # B x U/W fc6 units each, all-gathered by columns
        "fc8_output": rows * spec.num_classes,  # partial logits, reduce-scattered by rows
    }
    return {
        k: all_gather_bytes(n, world, element_size) + reduce_scatter_bytes(n, world, element_size)
        for k, n in parts.items()
    }


def pipeline_bytes_per_step(
    spec: AlexNetSpec, cuts: tuple[str, ...], stage: int, replica_rows: int, element_size: int = 4
) -> dict[str, int]:
    """Bytes pipeline stage ``stage`` sends in one training step (all micro-batches together):
    forward, the activations entering the next stage (the input of its first layer ``cuts[stage+1]``);
    backward, the gradient of this stage's own input (the input of ``cuts[stage]``).  Point to
    point: each tensor crosses one link once, so the figure does not depend on the micro-batches."""
    inputs = spec.layer_inputs()
    per_example = {name: math.prod(shape) for name, shape in inputs.items()}
    out = {"forward": 0, "backward": 0}
    if stage + 1 < len(cuts):
        out["forward"] = replica_rows * per_example[cuts[stage + 1]] * element_size
    if stage > 0:
        out["backward"] = replica_rows * per_example[cuts[stage]] * element_size
    return out


def fsdp_shard_elements(shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's shard of a parameter: FSDP2 cuts dim 0 into W equal parts,
    padding it to a multiple of W."""
    rows = -(-shape[0] // world) if shape else 1
    rest = 1
    for d in shape[1:]:
        rest *= d
    return rows * rest


def fsdp_bytes_per_step(
    units: list[list[tuple[int, ...]]], world: int, reshard_after_forward: bool, element_size: int = 4
) -> dict[str, int]:
    """Bytes one rank sends in one training step of fully sharded data parallelism, given the
    parameter shapes of every unit: each unit's parameters all-gathered for the forward, again
    for the backward when they were freed after the forward, and their gradients
    reduce-scattered back to the shards."""
    gather = reduce = 0
    for shapes in units:
        shard = sum(fsdp_shard_elements(s, world) for s in shapes)
        gather += all_gather_bytes(shard, world, element_size) * (2 if reshard_after_forward else 1)
        reduce += reduce_scatter_bytes(shard, world, element_size)
    return {"all_gather": gather, "reduce_scatter": reduce}
