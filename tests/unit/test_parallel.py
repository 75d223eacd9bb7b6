"""Placement planning without processes: more processes than GPUs on a node is refused
(mocked device counts), and the process groups distalex creates all carry the timeout."""

from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from distalex.errors import BadInput, ConfigError
from distalex.model.alexnet import AlexNetSpec
from distalex.parallel import launch, placement
from distalex.parallel.ddp import DDPOptions
from distalex.parallel.mesh import Mesh, process_groups


def plan(mode="ddp", world=4, towers=1, cuda=True, per_node=4, gpus=4):
    return Mesh.plan(mode, world, towers, 128, "no", cuda, processes_per_node=per_node, gpus=gpus)


def test_more_processes_than_gpus_on_a_node_is_refused_with_the_numbers():
    with pytest.raises(ConfigError) as err:
        plan(world=4, per_node=4, gpus=2)
    msg = str(err.value)
    assert "4 processes on this node but 2 visible GPU(s)" in msg and "at most 2 per node" in msg
    assert isinstance(err.value, BadInput) and err.value.exit_code == 2
    with pytest.raises(ConfigError, match="3 processes on this node but 0 visible"):
        plan("model-parallel", world=3, towers=3, per_node=3, gpus=0)


def test_as_many_gpus_as_processes_per_node_is_fine():
    assert plan(world=4, per_node=4, gpus=4).replicas == 4
    assert plan(world=4, per_node=2, gpus=2).replicas == 4  # two nodes, two GPUs each
    assert plan("model-parallel", world=4, towers=2, per_node=4, gpus=8).tower_ranks == 2
    assert plan(world=4, cuda=False, per_node=4, gpus=0).replicas == 4  # CPU processes: no GPU needed


class FakeAccelerator(SimpleNamespace):
    pass


def accelerator(world, local_index=0, device="cuda:0"):
    return FakeAccelerator(
        num_processes=world,
        process_index=local_index,
        local_process_index=local_index,
        device=torch.device(device),
        mixed_precision="no",
    )


def launched(monkeypatch, world: int, rank: int) -> None:
    """The variables a launcher sets for rank ``rank`` of ``world`` (they are checked together)."""
    for name, value in {"WORLD_SIZE": world, "RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1}.items():
        monkeypatch.setenv(name, str(value))


def test_setup_refuses_before_creating_any_process_group(monkeypatch):
    """2 processes on a node with 1 GPU (accelerate would map both ranks to cuda:0)."""
    launched(monkeypatch, 2, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(placement, "process_groups", lambda *a: pytest.fail("groups created before the check"))
    spec = AlexNetSpec()
    with pytest.raises(ConfigError, match="2 processes on this node but 1 visible GPU"):
        placement.make_placement("ddp", spec, 128, DDPOptions(), timedelta(seconds=60), accelerator(2))


def test_processes_per_node_from_the_launcher_or_the_local_index(monkeypatch):
    launched(monkeypatch, 16, 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert launch.processes_per_node(accelerator(16, local_index=3)) == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert launch.processes_per_node(accelerator(16, local_index=3)) == 4  # at least ranks 0..3 of this node
    assert launch.processes_per_node(accelerator(1)) == 1


def test_every_group_gets_the_timeout(monkeypatch):
    """The tower and replica groups of a 2x2 mesh are created with train.timeout_s (a group
    created without one gets the backend's default: 10 min NCCL, 30 min gloo)."""
    calls = []

    def new_subgroups_by_enumeration(ranks, timeout=None, **kwargs):
        calls.append((ranks, timeout))
        return object(), []

    monkeypatch.setattr(torch.distributed, "new_subgroups_by_enumeration", new_subgroups_by_enumeration)
    timeout = timedelta(seconds=17)
    process_groups(Mesh(4, 2, 2), timeout)
    assert calls == [([[0, 1], [2, 3]], timeout), ([[0, 2], [1, 3]], timeout)]


@pytest.mark.parametrize(
    ("mode", "mesh"),
    [("single", Mesh(1, 1, 1)), ("model-parallel", Mesh(2, 1, 2)), ("hybrid", Mesh(2, 2, 1, fc_shards=2))],
)
def test_the_built_model_lives_on_the_placements_device(mode, mesh):
    """Every placement's module is on its rank's device (a GPU run must not leave a tower or an
    fc shard on the CPU); the meta device stands in for a GPU here."""
    from distalex.parallel.placement import placement_for

    spec = AlexNetSpec(width=0.125, image_size=67, towers=2 if mode == "model-parallel" else 1)
    placement = placement_for(mode, mesh, 1, torch.device("meta"), spec)
    model = placement.build_model("xavier", seed=0)
    assert {p.device.type for p in model.parameters()} == {"meta"}, type(placement).__name__
