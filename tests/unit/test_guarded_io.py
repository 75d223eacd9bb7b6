"""Every write in distalex goes through distalex/runtime/io.py (``open_run_file``: never
through a symbolic link, never into a FIFO or a device).  This guard reads every module's
syntax tree and fails on a write-opening anywhere else: builtin ``open`` with a write mode
(or a mode it cannot read), ``os.open``, ``.write_text`` / ``.write_bytes``, and
``<anything>.open`` with a write mode (``Path.open("w")``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distalex"
GUARDED = "runtime/io.py"  # the one module that opens files for writing (open_run_file)
# (module, call) -> why it may write without open_run_file.  Empty: no exception today.
# (serving/export.py hands its temporary --out path to torch/onnx/safetensors writers; those
# are library calls, not opens in distalex, and --out is not a run dir.)
ALLOWED: dict[tuple[str, str], str] = {}
WRITE_CHARS = set("wax+")


def _mode(call: ast.Call, position: int):
    """The mode argument of an open-like call: its string, '' when absent, None when not a literal."""
    node = call.args[position] if len(call.args) > position else None
    for kw in call.keywords:
        if kw.arg == "mode":
            node = kw.value
    if node is None:
        return ""
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _writes(mode) -> bool:
    return mode is None or bool(WRITE_CHARS & set(mode))


def write_openings(source: str, filename: str = "<string>"):
    """(line, call) for every write-opening in ``source``."""
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "open" and _writes(_mode(node, 1)):
            yield node.lineno, "open"
        elif isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else ""
            if owner == "os" and f.attr == "open":
                yield node.lineno, "os.open"
            elif f.attr in ("write_text", "write_bytes"):
                yield node.lineno, f.attr
            elif f.attr == "open" and owner != "os" and _mode(node, 0) is not None and _writes(_mode(node, 0)):
                yield node.lineno, f"{owner or '?'}.open"


def test_no_module_but_runtime_io_opens_a_file_for_writing():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == GUARDED:
            continue
        for line, call in write_openings(path.read_text(), str(path)):
            if (rel, call) not in ALLOWED:
                found.append(f"distalex/{rel}:{line}: {call}(...) for writing")
    assert not found, "write through distalex.runtime.io (open_run_file / atomic_write / append_jsonl):\n" + "\n".join(
        found
    )


def test_runtime_io_exists_and_has_open_run_file():
    assert "def open_run_file(" in (PACKAGE / GUARDED).read_text()


@pytest.mark.parametrize(
    "snippet",
    [
        "open(p, 'w')",
        "open(p, mode='ab')",
        "open(p, 'r+')",
        "open(p, m)",
        "os.open(p, os.O_RDWR | os.O_CREAT)",
        "Path(p).write_text('x')",
        "p.write_bytes(b'x')",
        "p.open('w')",
        "p.open(mode='x')",
    ],
)
def test_the_guard_sees_each_write_opening(snippet):
    assert list(write_openings(snippet))


@pytest.mark.parametrize("snippet", ["open(p)", "open(p, 'rb')", "gzip.open(p, 'rb')", "Image.open(p)", "p.open()"])
def test_the_guard_lets_reads_pass(snippet):
    assert not list(write_openings(snippet))
