#!/usr/bin/env python
"""Compare finished runs side by side.

    python launch/compare.py RUN_DIR [RUN_DIR ...] [--out PATH]

Reads each run's ``summary.json`` (and ``metrics.jsonl`` for the curves),
prints a table -- split mode, world size W, towers, precision, final test
accuracy, training examples/sec, wall time, and the speed-up in examples/sec
relative to the FIRST run, and MFU -- and writes ``comparison.png`` (the runs'
curves overlaid and a throughput bar chart) and ``comparison.json`` (the
table's numbers).  ``--out`` is a directory for both files (default: the
current directory), or a ``.png`` path (the JSON goes beside it with a
``.json`` suffix).

Runs trained with ``train.profile=N`` have ``profile/summary.json``: their
profiles are printed (milliseconds per step by category, per process) and drawn
side by side, one bar per process, in ``comparison_profile.png`` beside the PNG.
A profile that is not a readable distalex profile is skipped with a warning.

Exit status: 0 success, 2 bad input (a missing run directory, a missing or
unreadable summary.json), 1 other failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from distalex.runtime.io import atomic_write, read_jsonl

COLUMNS = [  # (header, key, format)
    ("run", "label", "{}"),
    ("split", "split_mode", "{}"),
    ("W", "world_size", "{}"),
    ("towers", "towers", "{}"),
    ("precision", "precision", "{}"),
    ("test acc", "test_acc", "{:.4f}"),
    ("examples/s", "examples_per_sec", "{:.1f}"),
    ("wall s", "wall_time_s", "{:.1f}"),
    ("speed-up", "speedup", "{:.2f}x"),
    ("MFU", "mfu", "{:.1%}"),
]


class BadInput(Exception):
    """A run directory that cannot be compared (exit status 2)."""


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _read_rows(path: Path) -> list:
    """A run's metrics rows (a torn last line dropped); none when the file is missing or broken."""
    try:
        return read_jsonl(path)
    except (OSError, ValueError):
        return []


def load_run(run_dir: str) -> dict:
    path = Path(run_dir)
    if not path.is_dir():
        raise BadInput(f"run directory '{run_dir}' does not exist")
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise BadInput(f"'{run_dir}' has no summary.json (not a finished distalex run)")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"'{summary_path}' is not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(summary, dict):
        raise BadInput(f"'{summary_path}' does not hold a JSON object")
    mp = summary.get("mixed_precision")
    return {
        "dir": str(path),
        "label": path.resolve().name or str(path),
        "split_mode": summary.get("split_mode"),
        "world_size": summary.get("world_size"),
        "towers": summary.get("towers"),
        "mixed_precision": mp,
        "precision": None if mp is None else ("fp32" if mp == "no" else mp),
        "device": summary.get("device"),
        "test_acc": _number(summary.get("test_acc")),
        "examples_per_sec": _number(summary.get("examples_per_sec")),
        "wall_time_s": _number(summary.get("wall_time_s")),
        "mfu": _number(summary.get("mfu")),
        "rows": _read_rows(path / "metrics.jsonl"),
        "profile": load_profile(path / "profile" / "summary.json"),
    }


def load_profile(path: Path) -> list | None:
    """The per-process entries of a run's profile summary, or None (none, or not readable:
    a warning, since the comparison itself does not need it)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        ranks = data["ranks"]
        out = []
        for r in ranks:
            ms = {str(k): float(v) for k, v in r["ms_per_step"].items() if _number(v) is not None and v >= 0}
            out.append({"rank": int(r["rank"]), "ms_per_step": ms})
        if not out:
            raise ValueError("no processes")
        return out
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"compare: warning: skipping the profile '{path}' ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def profile_groups(ms: dict) -> dict:
    """compute / communication / data / other totals of one process's ms per step."""
    out = {"compute": 0.0, "comm": 0.0, "data": 0.0, "other": 0.0}
    for k, v in ms.items():
        key = "comm" if k.startswith("comm:") else k if k in ("data", "other") else "compute"
        out[key] += v
    return out


def format_profiles(runs: list[dict]) -> str:
    lines = ["profiles (ms per training step, each process's main thread):"]
    header = ["run", "rank", "step", "compute", "comm", "data", "other"]
    cells = [header]
    for r in runs:
        for entry in r["profile"] or []:
            g = profile_groups(entry["ms_per_step"])
            total = sum(entry["ms_per_step"].values())
            cells.append([r["label"], str(entry["rank"])] + [f"{x:.1f}" for x in (total, *g.values())])
    return "\n".join([*lines, render_cells(cells)])


def load_runs(run_dirs: list[str]) -> list[dict]:
    runs = [load_run(d) for d in run_dirs]
    # Unique labels: the directory name, or the path as given where names repeat.
    names = [r["label"] for r in runs]
    for r in runs:
        if names.count(r["label"]) > 1:
            r["label"] = r["dir"]
    base = runs[0]["examples_per_sec"]
    for r in runs:
        rate = r["examples_per_sec"]
        r["speedup"] = rate / base if rate is not None and base else None
    return runs


def format_table(runs: list[dict]) -> str:
    cells = [[h for h, _, _ in COLUMNS]]
    for r in runs:
        cells.append([("-" if r.get(k) is None else fmt.format(r[k])) for _, k, fmt in COLUMNS])
    return render_cells(cells)


def render_cells(cells: list[list[str]]) -> str:
    """Aligned text table: the first column left-aligned, the others right; a rule under the header."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def output_paths(out: str | None) -> tuple:
    if out is None:
        return Path("comparison.png"), Path("comparison.json")
    p = Path(out)
    if p.suffix.lower() == ".png":
        return p, p.with_suffix(".json")
    return p / "comparison.png", p / "comparison.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="train.output_dir of finished runs; the first is the speed-up baseline",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="directory for comparison.png/.json (default: current directory), or a .png path",
    )
    args = parser.parse_args(argv)
    png, js = output_paths(args.out)
    try:
        runs = load_runs(args.run_dirs)
        try:
            png.parent.mkdir(parents=True, exist_ok=True)
            js.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"cannot write to '{args.out}' ({exc.strerror or exc})") from None
    except BadInput as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2

    print(format_table(runs))
    print(f"speed-up: examples/sec relative to {runs[0]['label']}")

    from distalex.telemetry.plots import plot_comparison

    table = [{k: v for k, v in r.items() if k != "rows"} for r in runs]
    profiled = [r for r in runs if r["profile"]]
    profile_png = png.with_name(png.stem + "_profile.png")
    try:
        plot_comparison(runs, png)
        out = {"baseline": runs[0]["dir"], "png": str(png), "runs": table}
        if profiled:
            from distalex.telemetry.plots import plot_profile
            from distalex.telemetry.profiling import ordered

            bars = []
            for r in profiled:
                for entry in r["profile"]:
                    ms = entry["ms_per_step"]
                    bars.append(
                        (f"{r['label']} - rank {entry['rank']}", {"ms_per_step": {k: ms[k] for k in ordered(ms)}})
                    )
            plot_profile(bars, profile_png, "profiles side by side: ms per training step on each process's main thread")
            out["profile_png"] = str(profile_png)
        atomic_write(js, json.dumps(out, indent=2) + "\n")
    except OSError as exc:
        print(f"compare: error: cannot write to '{args.out or '.'}' ({exc.strerror or exc})", file=sys.stderr)
        return 2
    if profiled:
        print(format_profiles(profiled))
        print(f"wrote {png}, {profile_png} and {js}")
    else:
        print(f"wrote {png} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
