"""hybrid without processes: world-size validation, the shard layout, the byte
arithmetic, and the projected scaling model of launch/comm_bytes.py."""

import importlib.util
import json

import pytest
import torch

from distalex.errors import ConfigError
from distalex.model.alexnet import AlexNet, AlexNetSpec, count_parameters, init_weights
from distalex.parallel import hybrid
from distalex.parallel.comm import ddp_bytes_per_step, hybrid_bytes_per_step
from distalex.parallel.mesh import Mesh
from distalex.parallel.towers import shard_state_dict, unshard_state_dict

from helpers import ROOT

spec = importlib.util.spec_from_file_location("distalex_comm_bytes", ROOT / "launch" / "comm_bytes.py")
comm_bytes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(comm_bytes)


def plan(world, batch=128, fc_units=4096, width=1.0):
    return Mesh.plan("hybrid", world, 1, batch, "no", cuda=False, fc_units=fc_units, width=width)


def test_mesh_is_one_dimensional_data_parallel_and_fc_sharded():
    assert plan(4) == Mesh(4, 4, 1, fc_shards=4)
    assert plan(1) == Mesh(1, 1, 1)  # the single-device fallback


def test_batch_not_divisible_by_world_size():
    with pytest.raises(ConfigError) as err:
        plan(3, batch=128, fc_units=4095)
    assert str(err.value) == (
        "config key 'train.batch_size': the global batch 128 is not divisible by W=3 processes (128 % 3 = 2)"
    )


def test_fc_units_not_divisible_by_world_size():
    with pytest.raises(ConfigError) as err:
        plan(4, batch=128, fc_units=410, width=0.1)
    assert str(err.value) == (
        "hybrid splits fc6/fc7's units over the processes: 410 units (model.width=0.1) "
        "are not divisible by W=4 processes (410 % 4 = 2)"
    )


@pytest.mark.parametrize("towers", [1, 2])
def test_shards_cover_the_reference_exactly(towers):
    """Sharding a reference state dict W ways and joining it back is the identity;
    every rank's module takes its shard as is (names and shapes match)."""
    s = AlexNetSpec(width=0.125, image_size=67, towers=towers)
    torch.manual_seed(0)
    ref = AlexNet(s)
    init_weights(ref, "xavier")
    world = 4
    shards = [shard_state_dict(ref.state_dict(), r, world, dim_of=hybrid.shard_dim) for r in range(world)]
    joined = unshard_state_dict(shards, dim_of=hybrid.shard_dim)
    assert all(torch.equal(joined[k], v) for k, v in ref.state_dict().items())
    module = hybrid.HybridAlexNet(s, 1, world, group=None, stats=None)
    module.load_state_dict(shards[1])  # strict: same names, same shapes
    assert module.fc6.weight.shape == (s.fc_units // world, s.flat_features)
    assert module.fc8.weight.shape == (s.num_classes, s.fc_units // world)
    # Replicated: conv1..conv5 and fc8's bias; everything else is split W ways.
    replicated = [n for n, _ in ref.named_parameters() if hybrid.is_replicated(n)]
    assert replicated == [f"conv{i}.{k}" for i in range(1, 6) for k in ("weight", "bias")] + ["fc8.bias"]
    per_rank = count_parameters(module)
    shared = hybrid.replicated_parameters(s)
    assert per_rank - shared == (count_parameters(ref) - shared) // world


def test_bytes_of_the_d2l_network_are_far_below_ddp():
    """The d2l network at W=2: the three exchanges plus the conv all-reduce send
    under a ninth of DDP's bytes (its fc layers hold ~92% of the parameters)."""
    s = AlexNetSpec()
    full = count_parameters(AlexNet(s))
    conv = hybrid.replicated_parameters(s)
    assert 0.07 < conv / full < 0.09  # the paper's "~8% of the parameters"
    exchange = sum(hybrid_bytes_per_step(s, 2, 128).values())
    # forward + backward: 2 (W-1) rows (features + fc6 units + logits) x 4 bytes, rows = B/W
    assert exchange == 2 * 1 * 64 * (256 * 5 * 5 + 4096 + 10) * 4
    assert exchange + ddp_bytes_per_step(conv, 2) < ddp_bytes_per_step(full, 2) / 9


def test_projected_scaling_model():
    t1 = 0.03
    # Infinite bandwidth: perfect scaling; the formula's terms add.
    assert comm_bytes.projected_step_time(t1, 8, 1e9, float("inf")) == pytest.approx(t1 / 8)
    assert comm_bytes.projected_step_time(t1, 4, 2e8, 1e10) == pytest.approx(t1 / 4 + 0.02)
    rows = [comm_bytes._row("ddp", 4, "4 x1", 0, 2e8), comm_bytes._row("hybrid", 4, "4 shards", 1e7, 1e7)]
    table = comm_bytes.scaling_table(rows, t1, {"link": 1e10})
    by_mode = {r["split_mode"]: r for r in table}
    for r in table:
        assert r["efficiency"] == pytest.approx(t1 / (4 * r["step_time_s"]))
        assert r["speedup"] == pytest.approx(4 * r["efficiency"])
    assert by_mode["hybrid"]["efficiency"] > by_mode["ddp"]["efficiency"]


def test_comm_bytes_tables(tmp_path, capsys):
    out = tmp_path / "comm.json"
    comm_bytes.main(["--config", str(ROOT / "configs" / "d2l_fashion_mnist.yaml"), "--json", str(out)])
    text = capsys.readouterr().out
    assert "PROJECTED (a model, not a measurement)" in text
    data = json.loads(out.read_text())
    hybrid_rows = [r for r in data["bytes"] if r["split_mode"] == "hybrid"]
    assert [r["world_size"] for r in hybrid_rows] == [2, 4, 8, 16]
    for r in data["bytes"]:  # every world size has its ddp row, and hybrid sends fewer bytes than it
        if r["split_mode"] == "hybrid":
            ddp = next(d for d in data["bytes"] if d["split_mode"] == "ddp" and d["world_size"] == r["world_size"])
            assert r["total_bytes"] < ddp["total_bytes"]
    assert data["step_time_1_s"] == pytest.approx(128 / comm_bytes.D2L_V100_EXAMPLES_PER_SEC)
    assert len(data["projected"]) == len(comm_bytes.LINKS) * len(data["bytes"])
