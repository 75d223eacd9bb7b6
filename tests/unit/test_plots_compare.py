"""Curves, the comparison command and RunLog's tracker handling, without training."""

import importlib.util
import json

import pytest

from distalex.config import load_config
from distalex.runtime.io import read_jsonl
from distalex.telemetry.plots import curve_series, plot_comparison, plot_curves
from distalex.telemetry.records import RunLog
from distalex.telemetry.tracker import run_name

from helpers import ROOT, TINY, png_size

spec = importlib.util.spec_from_file_location("distalex_compare", ROOT / "launch" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def fake_rows(epochs=3, steps_per_epoch=4, acc0=0.5):
    rows = []
    for e in range(epochs):
        for s in range(1, steps_per_epoch + 1):
            step = e * steps_per_epoch + s
            rows.append(
                {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": 2.0 / step,
                    "lr": 0.1,
                    "examples_per_sec": 100.0,
                }
            )
        rows.append(
            {
                "step": (e + 1) * steps_per_epoch,
                "epoch": float(e + 1),
                "loss": 1.0 / (e + 1),
                "train_acc": acc0 + 0.1 * e,
                "test_acc": acc0 + 0.05 * e,
                "examples_per_sec": 100.0,
            }
        )
    return rows


def write_run(path, summary, rows=()):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    with open(path / "metrics.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


SUMMARY = {
    "split_mode": "single",
    "world_size": 1,
    "towers": 1,
    "mixed_precision": "no",
    "test_acc": 0.81234,
    "examples_per_sec": 400.0,
    "wall_time_s": 12.34,
    "loss": 0.5,
}


# -- plots ---------------------------------------------------------------------------
def test_curve_series_uses_step_rows_for_loss_and_epoch_rows_for_accuracy():
    s = curve_series(fake_rows())
    assert s["train loss"][0] == [step / 4 for step in range(1, 13)]
    assert s["train acc"] == ([1.0, 2.0, 3.0], pytest.approx([0.5, 0.6, 0.7]))
    assert s["test acc"] == ([1.0, 2.0, 3.0], pytest.approx([0.5, 0.55, 0.6]))
    # Epoch rows only (log_every larger than an epoch): loss from the epoch rows.
    only_epochs = [r for r in fake_rows() if "test_acc" in r]
    assert curve_series(only_epochs)["train loss"][0] == [1.0, 2.0, 3.0]
    # NaN stored as a string by RunLog is skipped, not plotted.
    assert curve_series([{"epoch": 0.5, "loss": "nan"}])["train loss"] == ([], [])


def test_plot_curves_writes_a_png(tmp_path):
    path = plot_curves(fake_rows(), tmp_path / "curves.png", title="run")
    size, width, height = png_size(path)
    assert size > 5000 and width > 200 and height > 150
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert plot_curves([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_plot_comparison_writes_a_png(tmp_path):
    runs = [
        {"label": "a", "rows": fake_rows(), "examples_per_sec": 100.0},
        {"label": "b", "rows": [], "examples_per_sec": None},
    ]  # no curves, no throughput: still drawn
    size, width, height = png_size(plot_comparison(runs, tmp_path / "sub" / "c.png"))
    assert size > 10000 and width > height > 100


# -- compare ---------------------------------------------------------------------------
def test_compare_table_json_and_png(tmp_path, capsys, monkeypatch):
    a = write_run(tmp_path / "single", SUMMARY, fake_rows())
    b = write_run(
        tmp_path / "ddp",
        {
            **SUMMARY,
            "split_mode": "ddp",
            "world_size": 2,
            "test_acc": 0.8,
            "examples_per_sec": 700.0,
            "wall_time_s": 7.0,
            "mixed_precision": "bf16",
            "mfu": 0.4567,
        },
        fake_rows(acc0=0.4),
    )
    monkeypatch.chdir(tmp_path)
    assert compare.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["single"], ["ddp"])}
    assert rows["single"][1:] == ["single", "1", "1", "fp32", "0.8123", "400.0", "12.3", "1.00x", "-"]
    assert rows["ddp"][1:] == ["ddp", "2", "1", "bf16", "0.8000", "700.0", "7.0", "1.75x", "45.7%"]
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["dir"] for r in report["runs"]] == [str(a), str(b)]
    assert report["runs"][1]["speedup"] == pytest.approx(1.75)
    assert report["runs"][0]["test_acc"] == SUMMARY["test_acc"]
    assert png_size(tmp_path / "comparison.png")[0] > 10000


def write_profile(run, ranks):
    prof = run / "profile"
    prof.mkdir()
    entries = [{"rank": r, "step_ms": sum(ms.values()), "ms_per_step": ms} for r, ms in enumerate(ranks)]
    (prof / "summary.json").write_text(json.dumps({"steps": 3, "ranks": entries}))


def test_compare_shows_profiles_side_by_side(tmp_path, capsys):
    a = write_run(tmp_path / "single", SUMMARY, fake_rows())
    b = write_run(tmp_path / "mp", {**SUMMARY, "split_mode": "model-parallel", "world_size": 2}, fake_rows())
    c = write_run(tmp_path / "plain", SUMMARY, fake_rows())  # no profile
    write_profile(a, [{"data": 1.0, "conv1": 30.0, "fc6": 10.0, "optimizer": 2.0, "other": 3.0}])
    both = {"data": 1.0, "conv1": 15.0, "fc6": 5.0, "comm:tower": 12.0, "other": 4.0}
    write_profile(b, [both, {**both, "comm:tower": 14.0}])
    assert compare.main([str(a), str(b), str(c), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    table = {tuple(ln.split()[:2]): ln.split()[2:] for ln in out.splitlines() if ln.split()[:1] in (["single"], ["mp"])}
    # run, rank -> step, compute, comm, data, other (ms per step)
    assert table[("single", "0")] == ["46.0", "42.0", "0.0", "1.0", "3.0"]
    assert table[("mp", "0")] == ["37.0", "20.0", "12.0", "1.0", "4.0"]
    assert table[("mp", "1")] == ["39.0", "20.0", "14.0", "1.0", "4.0"]
    report = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert report["profile_png"] == str(tmp_path / "out" / "comparison_profile.png")
    _, width, height = png_size(tmp_path / "out" / "comparison_profile.png")
    assert width > 300 and height > 150


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"ranks": 3}', '{"ranks": [{"rank": 0}]}', '{"ranks": []}', '{"ranks": [1]}']
)
def test_compare_skips_an_unreadable_profile_with_a_warning(tmp_path, capsys, content):
    a = write_run(tmp_path / "a", SUMMARY, fake_rows())
    (a / "profile").mkdir()
    (a / "profile" / "summary.json").write_text(content)
    assert compare.main([str(a), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    warnings = [ln for ln in captured.err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "skipping the profile" in warnings[0]
    assert not (tmp_path / "out" / "comparison_profile.png").exists()


def test_compare_out_png_path_and_duplicate_labels(tmp_path, capsys):
    a = write_run(tmp_path / "x" / "run", SUMMARY)
    b = write_run(tmp_path / "y" / "run", {**SUMMARY, "test_acc": None})  # no test accuracy: shown as '-'
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "out" / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert str(a) in out and str(b) in out  # same directory names: labelled by path
    assert (tmp_path / "out" / "cmp.png").is_file() and (tmp_path / "out" / "cmp.json").is_file()
    line = next(line for line in out.splitlines() if line.startswith(str(b)))
    assert line.split()[5] == "-"


@pytest.mark.parametrize("case", ["missing_dir", "no_summary", "corrupt_summary", "unwritable_out"])
def test_compare_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    good = write_run(tmp_path / "good", SUMMARY)
    args = [str(good), str(tmp_path / "nope")]
    if case == "no_summary":
        (tmp_path / "nope").mkdir()
    elif case == "corrupt_summary":
        (tmp_path / "nope").mkdir()
        (tmp_path / "nope" / "summary.json").write_text("{not json")
    elif case == "unwritable_out":
        (tmp_path / "file").write_text("")
        args = [str(good), "--out", str(tmp_path / "file" / "sub")]
    assert compare.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compare: error:")
    assert not (tmp_path / "comparison.png").exists()


# -- RunLog ----------------------------------------------------------------------------
class FakeTracker:
    name = "wandb"

    def __init__(self):
        self.run = None
        self.finished = 0

    def finish(self):
        self.finished += 1


class FakeAccelerator:
    """Records what RunLog asks of accelerate's tracking API; can fail on demand."""

    def __init__(self, fail_init=None, fail_log=None, log_with=("wandb",)):
        self.log_with, self.trackers, self.logged, self.inits = list(log_with), [], [], []
        self.fail_init, self.fail_log = fail_init, fail_log

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.inits.append((project, config, init_kwargs))
        self.trackers.append(FakeTracker())
        if self.fail_init:
            raise self.fail_init

    def log(self, values, step=None):
        if self.fail_log:
            raise self.fail_log
        self.logged.append((step, values))


def cfg(*overrides):
    return load_config(TINY, ["tracking.wandb=true", *overrides])


def epoch_row(step, epoch):
    return {"step": step, "epoch": epoch, "loss": 1.0, "train_acc": 0.5, "test_acc": 0.4}


def test_runlog_wandb_init_arguments(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    acc = FakeAccelerator()
    c = cfg("split_mode=ddp", "tracking.project=proj", "train.mixed_precision=no")
    log = RunLog(tmp_path / "run", True, acc)
    log.start_wandb(c, {"split_mode": "ddp"}, run_name(c, 4, "NVIDIA H100 80GB HBM3", "no"))
    ((project, config, init),) = acc.inits
    assert project == "proj" and config == {"split_mode": "ddp"}
    w = init["wandb"]
    assert w["name"] == "tiny-ddp-4xnvidia-h100-80gb-hbm3-fp32"
    assert (w["group"], w["job_type"], w["mode"]) == ("tiny", "ddp", "offline")
    assert w["dir"] == str(tmp_path / "run")  # offline files under the run's output dir
    assert log.wandb_on
    # Group, run name and WANDB_DIR are the user's to choose; with WANDB_MODE set, it decides.
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wd"))
    monkeypatch.setenv("WANDB_MODE", "online")
    acc = FakeAccelerator()
    c = cfg("tracking.group=g", "tracking.run_name=r")
    RunLog(tmp_path / "run2", True, acc).start_wandb(c, {}, run_name(c, 1, "cpu", "bf16"))
    w = acc.inits[0][2]["wandb"]
    assert (w["name"], w["group"], w["dir"]) == ("r", "g", str(tmp_path / "wd")) and "mode" not in w


def test_runlog_wandb_off_and_non_main_start_nothing(tmp_path):
    acc = FakeAccelerator()
    RunLog(tmp_path / "a", True, acc).start_wandb(cfg("tracking.wandb=false"), {}, "n")
    RunLog(tmp_path / "b", False, acc).start_wandb(cfg(), {}, "n")
    assert acc.inits == []


def test_runlog_non_main_writes_nothing(tmp_path):
    log = RunLog(tmp_path / "run", False, FakeAccelerator())
    log.log({"step": 1, "epoch": 0.5, "loss": 1.0})
    log.log(epoch_row(2, 1.0))
    log.finish({"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_runlog_curves_after_each_epoch_row_only(tmp_path):
    log = RunLog(tmp_path / "run", True, None)
    log.log({"step": 1, "epoch": 0.5, "loss": 1.0})
    assert not log.curves_path.exists()
    log.log(epoch_row(2, 1.0))
    first = log.curves_path.read_bytes()
    log.log({"step": 3, "epoch": 1.5, "loss": 0.8})
    log.log(epoch_row(4, 2.0))
    assert log.curves_path.read_bytes() != first  # redrawn with the second epoch
    png_size(log.curves_path)

    off = RunLog(tmp_path / "off", True, None, plots=False)
    off.log(epoch_row(2, 1.0))
    assert not off.curves_path.exists() and off.metrics_path.exists()


def test_runlog_plot_failure_warns_once_and_logging_goes_on(tmp_path, monkeypatch, capsys):
    import distalex.telemetry.plots

    def boom(*a, **k):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(distalex.telemetry.plots, "plot_curves", boom)
    log = RunLog(tmp_path / "run", True, None)
    for e in range(1, 4):
        log.log(epoch_row(e, float(e)))
    assert capsys.readouterr().err.count("warning: curves not written") == 1
    assert len(read_jsonl(log.metrics_path)) == 3


@pytest.mark.parametrize("where", ["init", "log"])
def test_runlog_tracker_failure_warns_once_and_logging_goes_on(tmp_path, capsys, where):
    exc = RuntimeError("service down\nsecond line of a long error")
    acc = FakeAccelerator(fail_init=exc if where == "init" else None, fail_log=exc if where == "log" else None)
    log = RunLog(tmp_path / "run", True, acc)
    log.start_wandb(cfg(), {}, "n")
    for step in range(1, 6):
        log.log({"step": step, "epoch": step / 5, "loss": 1.0 / step})
    log.finish({"loss": 0.2})
    err = capsys.readouterr().err
    assert err.count("warning: wandb tracker disabled") == 1
    assert "service down" in err and "second line" not in err  # one line
    assert acc.trackers == []  # the broken tracker is dropped
    assert [r["step"] for r in read_jsonl(log.metrics_path)] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"loss": 0.2}


def test_runlog_step_and_epoch_rows_of_one_step_reach_wandb_under_distinct_keys(tmp_path):
    """At an epoch's last step the step row and the epoch row share a wandb step; wandb merges
    what one step logs into one history row, so nothing of either row may share a key."""
    acc = FakeAccelerator()
    log = RunLog(tmp_path / "run", True, acc)
    log.start_wandb(cfg(), {}, "n")
    rows = [{"step": 2, "epoch": 1.0, "loss": 0.7, "lr": 0.1}, {**epoch_row(2, 1.0), "loss": 0.6, "lr": 0.1}]
    for row in rows:
        log.log(row)
    merged = {}  # what wandb keeps of step 2
    for step, values in acc.logged:
        assert step == 2
        merged.update(values)
    assert merged == {
        "step/epoch": 1.0, "step/loss": 0.7, "step/lr": 0.1,
        "epoch/epoch": 1.0, "epoch/loss": 0.6, "epoch/lr": 0.1, "epoch/train_acc": 0.5, "epoch/test_acc": 0.4,
    }  # fmt: skip
    assert read_jsonl(log.metrics_path) == rows


def test_runlog_unwritable_wandb_dir_warns_without_calling_wandb(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "file" / "sub"))
    acc = FakeAccelerator()
    log = RunLog(tmp_path / "run", True, acc)
    log.start_wandb(cfg(), {}, "n")
    err = capsys.readouterr().err
    assert err.count("warning: wandb tracker disabled") == 1 and "WANDB_DIR" in err
    assert acc.inits == [] and not log.wandb_on


def test_runlog_missing_wandb_package_warns(tmp_path, capsys):
    acc = FakeAccelerator(log_with=())  # accelerate drops 'wandb' when the package is missing
    log = RunLog(tmp_path / "run", True, acc)
    log.start_wandb(cfg(), {}, "n")
    assert capsys.readouterr().err.count("wandb tracker disabled (ImportError") == 1
    assert acc.inits == []


def test_runlog_finish_updates_summary_then_finishes_tracker(tmp_path):
    class Run:
        def __init__(self):
            self.summary, self.commits = {}, 0

        def log(self, values, commit=None):
            assert values == {} and commit
            self.commits += 1

    acc = FakeAccelerator()
    log = RunLog(tmp_path / "run", True, acc)
    log.start_wandb(cfg(), {}, "n")
    tracker = acc.trackers[0]
    tracker.run = Run()
    log.finish({"test_acc": 0.9, "loss": float("nan")})
    assert tracker.run.summary == {"test_acc": 0.9, "loss": "nan"} and tracker.run.commits == 1
    assert tracker.finished == 1 and not log.wandb_on


def test_credentials_decide_offline(tmp_path, monkeypatch):
    from distalex.telemetry.tracker import has_wandb_credentials

    for var in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not has_wandb_credentials()  # no netrc at all
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k\n")
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_credentials()  # a key for another host
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert has_wandb_credentials()
