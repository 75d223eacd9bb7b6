#!/usr/bin/env python
"""Mutation run: inject realistic bugs into the code every placement shares, one at a
time, and count how many the tests catch.

Each mutant is an exact text patch (file, old, new) applied to a scratch copy of
the repository (``git archive`` of a commit, unpacked in a temporary folder; the
working tree is never touched).  For each mutant the script runs a test selection
with ``pytest -x`` (a caught mutant stops at its first failing test) and records
caught / missed, the first failing test and the time taken.

The selection of a mutant is the existing tests that could plausibly catch it
(``tests`` below) plus the oracle tests (``ORACLES``) when the copy has them, so
one list serves a run on a commit before the oracles and one after::

    python scripts/mutants.py --list
    python scripts/mutants.py --ref f225bd0 --out before.json   # before the oracles
    python scripts/mutants.py --ref HEAD --out after.json       # with them
    python scripts/mutants.py --only sgd-drops-weight-decay --ref HEAD

First the selection of every mutant runs once unmutated (all must pass, or the
run stops: a failing baseline would count every mutant as caught);
``--no-baseline`` skips that.  The machine is usually shared: run it with
``nice -n 10`` in the background.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The oracles of the shared path (appended to every selection when present in the copy).
ORACLES = [
    "tests/unit/test_oracles.py",
    "tests/unit/test_augmentation.py",
    "tests/e2e/test_logged_figures.py",
    "tests/distributed/test_guards.py",
]

# Existing tests that could plausibly catch a mutant, grouped by the mechanism they exercise.
# (The placement comparisons are left out where both sides of the comparison run the mutant.)
LOOP = [
    "tests/unit/test_schedule.py",
    "tests/e2e/test_reliability.py::test_nan_guard_stops_and_keeps_good_checkpoint",
    "tests/e2e/test_tracking.py::test_offline_wandb_run_has_run_facts_config_and_final_summary",
    "tests/e2e/test_tiny_real_data.py",
]
REPLICAS = [*LOOP, "tests/e2e/test_imagefolder_training.py", "tests/distributed/test_placements.py"]
RESUME = [
    "tests/unit/test_schedule.py",
    "tests/e2e/test_reliability.py::test_kill_at_every_instant_of_a_step_then_resume_gives_the_uninterrupted_records",
    "tests/e2e/test_reliability.py::test_sigterm_checkpoints_and_resume_continues",
    "tests/distributed/test_placements.py::test_checkpoints_round_trip_across_placements",
]
RECORDS = [
    "tests/unit/test_resume_records.py",
    "tests/e2e/test_reliability.py::test_kill_at_every_instant_of_a_step_then_resume_gives_the_uninterrupted_records",
]
PLAN = [
    "tests/unit/test_data.py",
    "tests/unit/test_pipeline.py",
    "tests/unit/test_imagefolder.py",
    "tests/distributed/test_placements.py",
]
AUGMENT = [
    "tests/unit/test_imagefolder.py",
    "tests/unit/test_augmentation.py",
    "tests/unit/test_pixels.py",
    "tests/e2e/test_imagefolder_training.py",
]
EVAL = [
    "tests/unit/test_imagefolder.py",
    "tests/e2e/test_imagefolder_training.py",
    "tests/e2e/test_tiny_real_data.py",
]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: list = field(default_factory=list)
    why: str = ""


MUTANTS = [
    # -- the five the issue names -------------------------------------------------------------------
    Mutant(
        "sgd-drops-weight-decay",
        "distalex/training/build.py",
        "lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=o.foreach",
        "lr=o.lr, momentum=o.momentum, foreach=o.foreach",
        LOOP,
        "the SGD step silently ignores optim.weight_decay",
    ),
    Mutant(
        "plateau-fed-accuracy",
        "distalex/training/trainer.py",
        's.schedule.step_epoch(1.0 - self.run.last_eval["test_acc"])',
        's.schedule.step_epoch(self.run.last_eval["test_acc"])',
        LOOP,
        "the plateau schedule is fed the accuracy instead of the error",
    ),
    Mutant(
        "flip-never-applied",
        "distalex/data/pixels.py",
        "return (x.flip(1) if flip else x.contiguous()), shift",
        "return x.contiguous(), shift",
        AUGMENT,
        "the horizontal flip's result is dropped (out-of-place op)",
    ),
    Mutant(
        "epoch-loss-per-batch",
        "distalex/training/meters.py",
        "self._epoch += torch.stack([loss * n, correct, n])",
        "self._epoch += torch.stack([loss, correct, n])",
        LOOP,
        "the epoch row's loss is off by a factor of the batch size",
    ),
    Mutant(
        "nan-check-never-fires",
        "distalex/training/meters.py",
        "bad = (self._bad_step < 0) & ~torch.isfinite(loss)",
        "bad = (self._bad_step < 0) & torch.isinf(loss)",
        LOOP,
        "the loss guard misses NaN (tests isinf instead of not isfinite)",
    ),
    # -- optimizer and step ------------------------------------------------------------------------
    Mutant(
        "zero-grad-missing",
        "distalex/training/trainer.py",
        "        self.state.optimizer.zero_grad(set_to_none=True)\n",
        "",
        LOOP,
        "gradients accumulate over steps",
    ),
    Mutant(
        "lr-hard-coded",
        "distalex/training/build.py",
        "lr=o.lr, momentum=o.momentum",
        "lr=0.01, momentum=o.momentum",
        LOOP,
        "the optimizer uses d2l's 0.01 instead of optim.lr",
    ),
    Mutant(
        "label-smoothing",
        "distalex/parallel/placement.py",
        "loss = F.cross_entropy(logits, y)",
        "loss = F.cross_entropy(logits, y, label_smoothing=0.1)",
        LOOP,
        "the training loss smooths the labels",
    ),
    Mutant(
        "channels-last-only-on-gpu",
        "distalex/parallel/placement.py",
        "        if channels_last and self.channels_last_weights:\n",
        '        if channels_last and self.channels_last_weights and self.device.type == "cuda":\n',
        LOOP,
        "train.channels_last silently dropped for the model on CPU",
    ),
    # -- schedule --------------------------------------------------------------------------------
    Mutant(
        "lr-applied-one-epoch-late",
        "distalex/training/trainer.py",
        's.schedule.step_epoch(1.0 - self.run.last_eval["test_acc"])\n            s.schedule.apply(s.optimizer)',
        's.schedule.apply(s.optimizer)\n            s.schedule.step_epoch(1.0 - self.run.last_eval["test_acc"])',
        LOOP,
        "the new rate reaches the optimizer one epoch late",
    ),
    Mutant(
        "plateau-patience-off-by-one",
        "distalex/training/schedule.py",
        "if self.bad_epochs > self.patience and",
        "if self.bad_epochs >= self.patience and",
        LOOP,
        "the rate is cut one stalled epoch early",
    ),
    Mutant(
        "parameter-guard-any-instead-of-all",
        "distalex/parallel/placement.py",
        "return all(bool(torch.isfinite(p).all()) for p in model.parameters())",
        "return all(bool(torch.isfinite(p).any()) for p in model.parameters())",
        LOOP,
        "the parameter guard passes a tensor with one finite element",
    ),
    # -- meters / logged figures -------------------------------------------------------------------
    Mutant(
        "interval-never-reset",
        "distalex/training/meters.py",
        "        self._interval.zero_()\n",
        "",
        LOOP,
        "step rows report the running mean since the start",
    ),
    Mutant(
        "train-acc-per-batch-mean",
        "distalex/training/meters.py",
        "correct = (logits.detach().argmax(1) == labels).sum().double()",
        "correct = (logits.detach().argmax(1) == labels).double().mean()",
        LOOP,
        "train_acc divides the per-batch accuracy by the batch size again",
    ),
    Mutant(
        "examples-per-sec-per-replica",
        "distalex/training/meters.py",
        "examples_per_sec=self.examples_per_sec(seen),",
        "examples_per_sec=self.examples_per_sec(float(self._epoch[2].item())),",
        REPLICAS,
        "examples/sec counts one replica's examples instead of the global batch's",
    ),
    Mutant(
        "epoch-figures-not-summed-over-replicas",
        "distalex/training/meters.py",
        "loss_sum, correct, seen = self.placement.sum_over_replicas(self._epoch.clone()).tolist()",
        "loss_sum, correct, seen = self._epoch.clone().tolist()",
        REPLICAS,
        "the epoch row's loss and accuracy are rank 0's replica only",
    ),
    # -- evaluation -------------------------------------------------------------------------------
    Mutant(
        "eval-not-in-eval-mode",
        "distalex/training/evaluate.py",
        "    model.eval()\n",
        "    model.eval\n",
        EVAL,
        "evaluation runs with dropout on (call parentheses forgotten)",
    ),
    Mutant(
        "top5-as-top1",
        "distalex/training/evaluate.py",
        "counts[c * c] += (topk == y[:, None]).any(1).sum()",
        "counts[c * c] += (topk[:, 0] == y).sum()",
        EVAL,
        "top-5 accuracy computed as top-1",
    ),
    # -- data plan and pipeline --------------------------------------------------------------------
    Mutant(
        "plan-keeps-partial-batch",
        "distalex/data/common.py",
        "return self.n // self.global_batch",
        "return (self.n + self.global_batch - 1) // self.global_batch",
        PLAN,
        "off by one in the batch plan: the last partial global batch is kept",
    ),
    Mutant(
        "wrong-replica-slice",
        "distalex/data/common.py",
        "start = b * self.global_batch + lo",
        "start = b * self.local_batch + lo",
        PLAN,
        "replica slices of consecutive batches overlap",
    ),
    Mutant(
        "resize-align-corners",
        "distalex/data/memory.py",
        'mode="bilinear", align_corners=False',
        'mode="bilinear", align_corners=True',
        PLAN,
        "the device resize samples another grid than torchvision's Resize",
    ),
    Mutant(
        "crop-position-off-by-one",
        "distalex/data/pixels.py",
        "left = int(torch.randint(0, width - size + 1, (1,), generator=g))",
        "left = int(torch.randint(0, width - size, (1,), generator=g))",
        AUGMENT,
        "the rightmost crop position is never drawn",
    ),
    Mutant(
        "lighting-not-applied",
        "distalex/data/pixels.py",
        "            o.add_(shift_k[a : a + step])",
        "            pass",
        AUGMENT,
        "the PCA lighting is never applied in training (the channels-last batches the network gets)",
    ),
    # -- checkpoint and resume ---------------------------------------------------------------------
    Mutant(
        "momentum-dropped-on-restore",
        "distalex/training/checkpoint.py",
        'placement.local_tensors(saved["momentum"]).items()',
        'placement.local_tensors(saved.get("momentum_buffers", {})).items()',
        RESUME,
        "the momentum buffers are not restored (key name mismatch)",
    ),
    Mutant(
        "rng-not-restored",
        "distalex/training/checkpoint.py",
        '    torch.set_rng_state(state["cpu"])\n',
        "    torch.get_rng_state()\n",
        RESUME,
        "the RNG state is read instead of set on resume",
    ),
    Mutant(
        "schedule-not-applied-after-resume",
        "distalex/training/checkpoint.py",
        "    state.schedule.apply(state.optimizer)\n",
        "",
        RESUME,
        "a resumed run trains at the config's rate until the next epoch end",
    ),
    Mutant(
        "rank-0-figures-on-every-rank",
        "distalex/training/checkpoint.py",
        "        mine = meters[placement.rank]\n",
        "        mine = meters[0]\n",
        RECORDS,
        "every rank resumes with rank 0's running figures: the epoch row after a mid-epoch resume is wrong",
    ),
    Mutant(
        "stale-epoch-row-kept-on-resume",
        "distalex/telemetry/records.py",
        "                if r != carried or seen_carried:\n",
        "                if seen_carried:\n",
        RECORDS,
        "an epoch row logged after its step's checkpoint is kept on resume and logged again",
    ),
]


# --------------------------------------------------------------------------- running


def scratch_copy(ref: str, dest: Path) -> None:
    """The tree of commit ``ref``, unpacked into ``dest``."""
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def selection(m: Mutant, copy: Path, oracles: bool) -> list:
    """The oracles present in the copy (first: they are the quick ones), then the mutant's own tests.
    The order changes only how soon ``pytest -x`` stops, never the verdict."""
    tests = [t for t in ORACLES if (copy / t.split("::")[0]).exists()] if oracles else []
    return list(dict.fromkeys(tests + list(m.tests)))


def run_pytest(copy: Path, tests: list, timeout: float) -> tuple:
    """(outcome, first failing test, seconds, output tail): outcome is pass, fail, timeout or error."""
    env = dict(os.environ, PYTHONPATH=str(copy), WANDB_MODE="disabled", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", None, time.time() - t0, ""
    seconds = time.time() - t0
    failed = next((ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))), None)
    outcome = {0: "pass", 1: "fail"}.get(proc.returncode, "error")
    if outcome == "error":
        failed = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [f"pytest exit {proc.returncode}"]
        failed = failed[0]
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:]) if outcome != "pass" else ""
    return outcome, failed, seconds, tail


def apply(copy: Path, m: Mutant) -> str:
    path = copy / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutant {m.name}: the text to replace occurs {text.count(m.old)} times in {m.file}")
    path.write_text(text.replace(m.old, m.new))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="commit whose tree is mutated (default HEAD)")
    parser.add_argument("--only", nargs="*", help="mutant names (default: all)")
    parser.add_argument("--no-oracles", action="store_true", help="existing tests only, even if the oracles exist")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selections")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mutant (a timeout counts as error)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (updated after every mutant)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that every patch applies to --ref")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        raise SystemExit(f"unknown mutant(s): {sorted(set(args.only) - {m.name for m in MUTANTS})}")
    if args.list:
        for m in chosen:
            print(f"{m.name:42s} {m.file:32s} {m.why}")
        return 0

    commit = subprocess.run(["git", "rev-parse", args.ref], cwd=ROOT, capture_output=True, text=True, check=True)
    report = {"ref": args.ref, "commit": commit.stdout.strip(), "oracles": not args.no_oracles, "mutants": []}
    with tempfile.TemporaryDirectory(prefix="distalex-mutants-") as tmp:
        copy = Path(tmp)
        scratch_copy(args.ref, copy)
        for m in chosen:  # every patch must apply before anything runs
            (copy / m.file).write_text(apply(copy, m))
        if args.check:
            print(f"all {len(chosen)} patches apply to {args.ref}")
            return 0
        if not args.no_baseline:
            union = list(dict.fromkeys(t for m in chosen for t in selection(m, copy, not args.no_oracles)))
            print(f"baseline: {len(union)} test paths unmutated ...", flush=True)
            outcome, failed, seconds, tail = run_pytest(copy, union, args.timeout * 2)
            report["baseline"] = {"outcome": outcome, "failed": failed, "seconds": round(seconds), "output": tail}
            print(f"baseline: {outcome} in {seconds:.0f} s {failed or ''}", flush=True)
            if outcome != "pass":
                _write(args.out, report)
                return 1
        for i, m in enumerate(chosen, 1):
            tests = selection(m, copy, not args.no_oracles)
            original = apply(copy, m)
            try:
                outcome, failed, seconds, tail = run_pytest(copy, tests, args.timeout)
            finally:
                (copy / m.file).write_text(original)
            verdict = {"fail": "caught", "pass": "missed"}.get(outcome, outcome)
            report["mutants"].append(
                {
                    **asdict(m),
                    "tests": tests,
                    "verdict": verdict,
                    "caught_by": failed,
                    "seconds": round(seconds),
                    "output": tail,  # the end of pytest's report (why it failed)
                }
            )
            print(f"[{i}/{len(chosen)}] {m.name}: {verdict} in {seconds:.0f} s {failed or ''}", flush=True)
            _write(args.out, report)
    verdicts = [r["verdict"] for r in report["mutants"]]
    report["caught"] = verdicts.count("caught")
    report["total"] = len(verdicts)
    _write(args.out, report)
    print(
        f"{report['caught']} of {report['total']} caught ({args.ref}, oracles {'on' if report['oracles'] else 'off'})"
    )
    others = [r["name"] for r in report["mutants"] if r["verdict"] not in ("caught", "missed")]
    if others:
        print(f"not decided (timeout/error): {others}")
    return 0


def _write(path, report) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
