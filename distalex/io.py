"""The one place distalex writes and reads its run files.

* :func:`atomic_write`: a temporary file beside the target, flushed and
  fsynced, renamed over the target, the folder fsynced.  A crash or kill at
  any instant leaves either the old file or the complete new one, never a
  half-written file under the final name; a failed write (a full disk, say)
  removes its temporary file and leaves the old file as it was.
* :func:`read_jsonl`: the rows of a JSON-lines file; a torn last line (a
  kill during an append) is dropped, a broken line before it is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

Content = bytes | str | Callable[[IO[bytes]], None]


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
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def write_json(path, obj) -> Path:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path) -> list:
    """Rows of a JSON-lines file.  A last line that does not parse is a torn append and is dropped."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line for line in fh.read().split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def write_jsonl(path, rows) -> Path:
    """Replace a JSON-lines file with ``rows``, atomically."""
    return atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path, row: dict) -> None:
    """Append one row.  A kill mid-append leaves at most a torn last line, which :func:`read_jsonl` drops."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
