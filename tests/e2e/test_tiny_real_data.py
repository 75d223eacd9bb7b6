"""End to end: configs/tiny.yaml trains on real Fashion-MNIST to a useful accuracy."""

from helpers import TINY, metrics, run_cli, summary


def test_tiny_config_learns_fashion_mnist(tmp_path):
    run_cli("--config", TINY, "tracking.wandb=false", "train.progress=false", f"train.output_dir={tmp_path}")
    s = summary(tmp_path)
    assert s["test_acc"] >= 0.75, s
    assert s["split_mode"] == "single" and s["world_size"] == 1 and s["towers"] == 1
    assert s["examples_per_sec"] > 0 and s["wall_time_s"] > 0
    epochs = [r for r in metrics(tmp_path) if "train_acc" in r]
    assert [r["epoch"] for r in epochs] == [1.0, 2.0, 3.0]
    for row in epochs:
        assert {"step", "epoch", "loss", "train_acc", "test_acc", "examples_per_sec"} <= row.keys()
    assert epochs[-1]["loss"] < epochs[0]["loss"]
