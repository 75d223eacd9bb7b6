"""The one place distalex writes and reads its run files.

* :func:`atomic_write`: a temporary file beside the target, flushed and
  fsynced, renamed over the target, the folder fsynced.  A crash or kill at
  any instant leaves either the old file or the complete new one, never a
  half-written file under the final name; a failed write (a full disk, say)
  removes its temporary file and leaves the old file as it was.
* Any OSError while writing a run file (a full disk, a quota, a read-only
  file system, an I/O error) becomes one :class:`~distalex.errors.WriteError`
  line naming the file and the reason (exit 1): the run failed, what it wrote
  before is kept.
* :func:`remove_stale_temps`: the temporary files a killed writer left behind
  (called by the run that owns the output dir, before it writes).
* :func:`read_jsonl`: the rows of a JSON-lines file; a torn last line (a
  kill during an append) is dropped, a broken line before it is an error.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO

from distalex.errors import WriteError

Content = bytes | str | Callable[[IO[bytes]], None]
TEMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")  # .<target name>.<pid>.tmp, see atomic_write
_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file is larger than allowed (by the file system or ulimit -f)",
    errno.EIO: "the disk reported an I/O error",
}


def describe(exc: OSError) -> str:
    """Why a write failed, in words: 'the disk is full (ENOSPC: No space left on device)'."""
    code = errno.errorcode.get(exc.errno or 0, "")
    detail = f"{code}: {exc.strerror}" if code and exc.strerror else (exc.strerror or str(exc) or type(exc).__name__)
    reason = _REASONS.get(exc.errno or 0)
    return f"{reason} ({detail})" if reason else detail


def write_failed(path, exc: OSError) -> WriteError:
    return WriteError(f"cannot write '{path}': {describe(exc)}")


def ensure_dir(path) -> Path:
    """``mkdir -p``; a failure is a :class:`WriteError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failed(path, exc) from None
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, content: Content) -> Path:
    """Write ``content`` (bytes, text, or a function that writes into a binary file) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise write_failed(path, exc) from None
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temps(directory) -> list:
    """Delete the temporary files of :func:`atomic_write` left in ``directory`` by a killed
    writer (only the owner of the output dir may call this).  Returns their paths."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if TEMP_NAME.match(p.name) and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def write_json(path, obj) -> Path:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path) -> list:
    """Rows (JSON objects) of a JSON-lines file.  A last line that does not parse is a torn
    append and is dropped; a bad line before it is a ValueError naming it."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line for line in fh.read().split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if not isinstance(row, dict):
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON object")
        rows.append(row)
    return rows


def write_jsonl(path, rows) -> Path:
    """Replace a JSON-lines file with ``rows``, atomically."""
    return atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path, row: dict) -> None:
    """Append one row.  A kill mid-append leaves at most a torn last line, which :func:`read_jsonl` drops."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    except OSError as exc:
        raise write_failed(path, exc) from None
