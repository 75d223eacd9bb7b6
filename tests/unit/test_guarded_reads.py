"""Every read in distalex goes through distalex/runtime/io.py (``open_for_reading`` /
``read_bytes``: non-blocking, regular files only, bounded), and the opener itself holds
against generated file kinds and sizes.

The guard reads every module's syntax tree and fails on a read-opening anywhere else: builtin
``open``, ``os.open``, ``.read_text`` / ``.read_bytes``, ``<anything>.open`` (``Path.open``,
``gzip.open``, ``Image.open``), ``gzip.GzipFile`` of a name, and the libraries' path-taking
loaders (``safe_open``, ``safetensors``' ``load_file``, ``OmegaConf.load``, ``np.load`` /
``np.fromfile`` / ``np.memmap``, ``torch.load``, ``torch.export.load``, onnxruntime's
``InferenceSession``).  A path-taking call is allowed only on what the guarded opener gave:
a file object bound by ``with <opener>(...) as NAME`` in the same function, ``reopen_path``
of one, or bytes / text already read (``read_bytes``, ``StringIO``)."""

from __future__ import annotations

import ast
import errno
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distalex.errors import BadInput, ConfigError
from distalex.runtime.io import open_for_reading, read_bytes

PACKAGE = Path(__file__).resolve().parents[2] / "distalex"
GUARDED = "runtime/io.py"
# Functions that open a file for reading through open_for_reading (checked below).
OPENERS = {"open_for_reading", "open_regular_for_reading", "open_image_file", "_open_back"}
# Calls whose result is bytes or text already read through the opener (or no file at all).
READ_ALREADY = {"read_bytes", "_read_back", "reopen_path", "StringIO", "BytesIO"}
PATH_TAKING = {
    "safe_open", "load_file", "load", "fromfile", "memmap", "InferenceSession", "FashionMNIST", "GzipFile",
}  # fmt: skip
# (module, call) -> why it may read a path without the opener.
ALLOWED: dict[tuple[str, str], str] = {
    ("data/fashion_mnist.py", "FashionMNIST"): (
        "torchvision downloads the four files into its cache and checks them itself; distalex then "
        "reads them through _read_verified (streamed, size and md5 checked) like any other copy"
    ),
}


def _name(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _owner(f: ast.Attribute) -> str:
    return f.value.id if isinstance(f.value, ast.Name) else _name(f.value)


def _bound_by_openers(scope) -> set[str]:
    names = set()
    for node in ast.walk(scope):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                expr = item.context_expr
                if (
                    isinstance(expr, ast.Call)
                    and _name(expr.func) in OPENERS
                    and isinstance(item.optional_vars, ast.Name)
                ):
                    names.add(item.optional_vars.id)
    return names


def _from_opener(arg, bound: set[str]) -> bool:
    if isinstance(arg, ast.Name):
        return arg.id in bound
    if isinstance(arg, ast.Call) and _name(arg.func) in READ_ALREADY:
        return _name(arg.func) != "reopen_path" or (bool(arg.args) and _from_opener(arg.args[0], bound))
    return False


def _first_arg(call: ast.Call):
    if call.args:
        return call.args[0]
    for kw in call.keywords:
        if kw.arg in ("fileobj", "f", "filename", "file", "path"):
            return kw.value
    return None


def read_openings(source: str, filename: str = "<string>"):
    """(line, call) for every read-opening in ``source`` that does not read what the opener gave."""
    tree = ast.parse(source, filename=filename)
    scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    innermost: dict[int, ast.AST] = {}
    for scope in scopes:  # ast.walk is breadth first: an inner function overwrites its outer one
        for node in ast.walk(scope):
            if isinstance(node, ast.Call):
                innermost[id(node)] = scope
    bound = {id(scope): _bound_by_openers(scope) for scope in scopes}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f, names = node.func, bound[id(innermost[id(node)])]
        call = _name(f)
        if isinstance(f, ast.Name) and f.id == "open":
            yield node.lineno, "open"
        elif isinstance(f, ast.Attribute) and _owner(f) == "os" and f.attr == "open":
            yield node.lineno, "os.open"
        elif isinstance(f, ast.Attribute) and f.attr in ("read_text", "read_bytes"):
            yield node.lineno, f.attr
        elif isinstance(f, ast.Attribute) and f.attr == "open" and not _from_opener(_first_arg(node), names):
            yield node.lineno, f"{_owner(f) or '?'}.open"
        elif call == "GzipFile":
            if not any(kw.arg == "fileobj" and _from_opener(kw.value, names) for kw in node.keywords):
                yield node.lineno, call
        elif call in PATH_TAKING and call != "GzipFile":
            if call == "load" and isinstance(f, ast.Attribute) and _owner(f) in ("json", "yaml", "pickle"):
                continue  # file objects / text: whoever opened them is checked above
            if _first_arg(node) is None:
                continue  # no file named at all (PIL's im.load())
            if not _from_opener(_first_arg(node), names):
                yield node.lineno, (f"{_owner(f)}.{call}" if isinstance(f, ast.Attribute) else call)


def test_no_module_but_runtime_io_opens_a_file_for_reading():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == GUARDED:
            continue
        for line, call in read_openings(path.read_text(), str(path)):
            if (rel, call.split(".")[-1]) not in ALLOWED:
                found.append(f"distalex/{rel}:{line}: {call}(...)")
    assert not found, "read through distalex.runtime.io (open_for_reading / read_bytes):\n" + "\n".join(found)


def test_every_opener_the_guard_trusts_opens_through_open_for_reading():
    """A name in OPENERS is trusted only if its definition returns open_for_reading(...)."""
    defined = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in OPENERS:
                defined[node.name] = node
    assert set(defined) == OPENERS
    for name, node in defined.items():
        if name == "open_for_reading":
            continue
        calls = {_name(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
        assert "open_for_reading" in calls, name


def test_the_allow_list_is_used():
    """Every allowance still names a call that exists (a stale entry would hide a new one)."""
    for module, call in ALLOWED:
        assert any(c.endswith(call) for _, c in read_openings((PACKAGE / module).read_text())), (module, call)


@pytest.mark.parametrize(
    "snippet",
    [
        "open(p)",
        "open(p, 'rb')",
        "os.open(p, os.O_RDONLY)",
        "Path(p).read_text()",
        "p.read_bytes()",
        "p.open()",
        "gzip.open(p, 'rb')",
        "Image.open(p)",
        "gzip.GzipFile(p)",
        "safe_open(str(p), framework='pt')",
        "safe_open(reopen_path(other), framework='pt')",
        "OmegaConf.load(p)",
        "np.load(p)",
        "np.fromfile(p, dtype=np.uint8)",
        "torch.load(p)",
        "torch.export.load(str(p))",
        "load_file(str(p))",
        "onnxruntime.InferenceSession(str(p))",
        "def f(p):\n    with open(p) as fh:\n        return Image.open(fh)",
        "def f(p):\n    with open_for_reading(p, what='x', max_bytes=1) as fh:\n        pass\n"
        "def g(fh):\n    return Image.open(fh)",
    ],
)
def test_the_guard_sees_each_read_opening(snippet):
    assert list(read_openings(snippet))


@pytest.mark.parametrize(
    "snippet",
    [
        "def f(p):\n    with open_for_reading(p, what='x', max_bytes=1) as fh, Image.open(fh) as im:\n        pass",
        "def f(p):\n    with open_image_file(p) as fh:\n        return Image.open(fh)",
        "def f(p):\n    with open_for_reading(p, what='x', max_bytes=None) as c:\n"
        "        return safe_open(reopen_path(c), framework='pt')",
        "def f(p):\n    with open_for_reading(p, what='x', max_bytes=9) as fh:\n"
        "        return gzip.GzipFile(fileobj=fh, mode='rb')",
        "OmegaConf.load(io.StringIO(text))",
        "read_bytes(p, what='x', max_bytes=1)",
        "json.loads(text)",
        "json.load(fh)",
        "onnxruntime.InferenceSession(_read_back(p))",
    ],
)
def test_the_guard_lets_guarded_reads_pass(snippet):
    assert not list(read_openings(snippet))


# -- the opener itself -------------------------------------------------------------------------
KINDS = ("regular", "fifo", "directory", "socket", "symlink", "dangling", "missing", "device")


def _make(kind: str, path: Path, size: int) -> None:
    if kind == "regular":
        with open(path, "wb") as fh:
            fh.truncate(size)  # sparse: any size costs nothing
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "symlink":
        target = path.with_name(path.name + ".target")
        with open(target, "wb") as fh:
            fh.truncate(size)
        path.symlink_to(target)
    elif kind == "dangling":
        path.symlink_to(path.with_name("nowhere"))
    elif kind == "device":
        path.symlink_to("/dev/zero")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(KINDS),
    size=st.one_of(st.integers(0, 64), st.integers(0, 1 << 40)),
    cap=st.integers(0, 1 << 32),
    follow=st.booleans(),
)
def test_open_for_reading_refuses_all_but_a_regular_file_within_its_cap(tmp_path_factory, kind, size, cap, follow):
    """Every generated file: either the regular file (within the cap) is opened, or one
    ConfigError line names it and says why -- never a hang, never another exception."""
    path = tmp_path_factory.mktemp("k") / "f"
    _make(kind, path, size)
    result: list = []

    def attempt():
        try:
            with open_for_reading(path, what="test file", max_bytes=cap, error=ConfigError, follow=follow) as fh:
                result.append(("opened", os.fstat(fh.fileno())))
        except ConfigError as exc:
            result.append(("refused", str(exc)))
        except BaseException as exc:  # the property: nothing else escapes
            result.append(("other", exc))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert result, f"open_for_reading blocked on a {kind}"
    outcome, detail = result[0]
    assert outcome != "other", detail
    regular_target = kind == "regular" or (kind == "symlink" and follow)
    if outcome == "opened":
        assert regular_target and stat.S_ISREG(detail.st_mode) and detail.st_size <= cap
    else:
        assert "\n" not in detail and str(path) in detail and "test file" in detail
        assert not regular_target or size > cap, detail
        if kind == "fifo":
            assert "a FIFO" in detail


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 3000), cap=st.integers(0, 3000))
def test_read_bytes_returns_the_file_or_refuses_past_the_cap(tmp_path_factory, size, cap):
    path = tmp_path_factory.mktemp("r") / "f"
    data = os.urandom(size)
    with open(path, "wb") as fh:
        fh.write(data)
    if size <= cap:
        assert read_bytes(path, what="x", max_bytes=cap) == data
    else:
        with pytest.raises(BadInput, match="larger than"):
            read_bytes(path, what="x", max_bytes=cap)


def test_read_bytes_stops_at_the_cap_on_a_file_without_a_size():
    """/proc files report size 0: the cap is enforced while reading, not only from fstat."""
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(BadInput, match="larger than 8 bytes"):
        read_bytes("/proc/self/status", what="status", max_bytes=8)
    assert b"Name:" in read_bytes("/proc/self/status", what="status", max_bytes=1 << 20)


def test_refusal_carries_the_reason_alone():
    with pytest.raises(BadInput) as info:
        read_bytes("/nonexistent/x", what="x", max_bytes=1)
    assert info.value.reason == "it does not exist"
    assert errno.ENOENT  # the reason replaces the errno text a traceback would show


# -- every reader, given a FIFO where it expects a file ------------------------------------------
def _config(p):
    from distalex.config import load_config

    load_config(str(p))


def _checkpoint(p):
    from distalex.training.checkpoint import read

    read(p)


def _records(p):
    from distalex.runtime.io import read_jsonl

    read_jsonl(p)


def _image_check(p):
    from distalex.data.imagefolder import image_problem

    why = image_problem(str(p))
    assert why is not None and "a FIFO" in why, why
    raise BadInput(why)


def _image_during_run(p):
    from distalex.data.imagefolder import _load_rgb

    _load_rgb(str(p))


def _predicted_image(p):
    from distalex.data.images import open_image

    open_image(p, "RGB")


def _fashion_file(p):
    from distalex.data.fashion_mnist import _read_verified

    _read_verified(p, "t10k-labels-idx1-ubyte")


def _peak_cache(p):
    from distalex.telemetry.peak import _read_cache

    entries, why = _read_cache(p)
    assert entries == {} and "a FIFO" in why, why
    raise BadInput(why)


def _lock_holder(p):
    from distalex.runtime.rundir import _holder

    assert _holder(p) == "holder unknown"
    raise BadInput("holder unknown")


READERS = {
    "config": (_config, "ConfigError"),
    "checkpoint": (_checkpoint, "CheckpointError"),
    "records": (_records, "RunDirError"),
    "image_check": (_image_check, "BadInput"),
    "image_during_run": (_image_during_run, "DataFailure"),
    "predicted_image": (_predicted_image, "DataError"),
    "fashion_mnist_file": (_fashion_file, "DataError"),
    "peak_cache": (_peak_cache, "BadInput"),
    "lock_holder": (_lock_holder, "BadInput"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_refuses_a_fifo_at_once_in_one_line(tmp_path, reader):
    """Each place distalex reads a file, handed a FIFO with no writer: one line of the
    caller's error class, at once (a plain open would block for ever: the thread would hang)."""
    fn, expected = READERS[reader]
    fifo = tmp_path / ("t10k-labels-idx1-ubyte" if reader == "fashion_mnist_file" else "f.png")
    os.mkfifo(fifo)
    result: list = []

    def attempt():
        try:
            fn(fifo)
            result.append(("returned", None))
        except Exception as exc:
            result.append((type(exc).__name__, str(exc)))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert result, f"{reader}: blocked on a FIFO"
    kind, message = result[0]
    assert kind == expected, result
    assert "\n" not in message and "FIFO" in message or reader == "lock_holder", message
