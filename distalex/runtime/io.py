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
* :func:`open_run_file`: the one way distalex opens a run file for writing (the lock,
  :func:`atomic_write`'s temporary file, :func:`append_jsonl`).  It never follows a
  symbolic link (``O_NOFOLLOW`` on the last component) and refuses anything but a regular
  file (a FIFO, a device, a socket, a directory) with one :class:`WriteError` line, before a
  byte is written: a link planted where a run file is expected cannot make a run overwrite
  the file it points to.  ``tests/unit/test_guarded_io.py`` checks no other module opens a
  file for writing.
* :func:`remove_stale_temps`: the temporary files a killed writer left behind
  (called by the run that owns the output dir, before it writes).
* :func:`open_for_reading` / :func:`read_bytes`: the one way distalex opens a file it
  reads (a config, an image, a data file, a checkpoint, the records, the peak cache).  The
  file is opened ``O_NONBLOCK`` (a FIFO with no writer never blocks the open), ``fstat``-ed,
  and refused unless it is a regular file (a FIFO, a device, a socket, a directory: one line
  naming it and what it is); its size is capped at what that kind of file can legitimately
  hold (a sparse 50 GB file is refused from its ``fstat``, before a byte is read).  Libraries
  that insist on a path (safetensors' ``safe_open``) get :func:`reopen_path` of a file this
  module opened and checked.  ``tests/unit/test_guarded_reads.py`` checks no other module
  opens a file for reading.
* :func:`read_jsonl`: the rows of a JSON-lines file; a torn last line (a
  kill during an append) is dropped, a broken line before it is an error.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

from distalex.errors import BadInput, DistalexError, RunDirError, WriteError

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


_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
}


def not_a_regular_file(path) -> str | None:
    """Why ``path`` (not followed if it is a link) cannot be a run file -- 'a symbolic link',
    'a FIFO', ... -- or None when it is a regular file or does not exist."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unusable ({describe(exc)})"
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _refused(path, kind: str) -> WriteError:
    return WriteError(
        f"cannot write '{path}': it is {kind}, where distalex keeps a regular file; "
        f"distalex writes no file through a link or into a special file (remove it, or choose another output dir)"
    )


def open_run_file(path, flags: int, mode: int = 0o644) -> int:
    """The one place a run file is opened for writing: ``os.open(path, flags)`` with
    ``O_NOFOLLOW`` (a link as the last component fails instead of being followed),
    ``O_CLOEXEC`` and, while opening, ``O_NONBLOCK`` (a FIFO never blocks the run); the
    opened file must be a regular file.  A link or a special file: :class:`WriteError`
    naming it, with nothing written and nothing truncated (``O_TRUNC`` is refused here:
    truncate after the check).  Any other OSError: :class:`WriteError` with the reason."""
    if flags & os.O_TRUNC:
        raise ValueError("open_run_file: pass no O_TRUNC (truncate after the file is checked)")
    kind = not_a_regular_file(path)
    if kind is not None:
        raise _refused(path, kind)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # a link / a FIFO / a directory put there meanwhile
            raise _refused(path, not_a_regular_file(path) or "not a regular file") from None
        raise write_failed(path, exc) from None
    try:
        mode_now = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode_now):
            raise _refused(path, _KINDS.get(stat.S_IFMT(mode_now), "not a regular file"))
        os.set_blocking(fd, True)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise write_failed(path, exc) from None
        raise
    return fd


def open_regular_for_reading(path) -> IO[bytes]:
    """A binary file object for reading ``path`` if it is a regular file, never following a
    link (what pruning and ``resume=auto`` look into); OSError saying why otherwise."""
    try:
        return open_for_reading(path, what="file", max_bytes=None, follow=False)
    except BadInput as exc:
        raise OSError(errno.EINVAL, exc.reason) from None


def _read_refused(error: type[DistalexError], what: str, path, reason: str) -> DistalexError:
    exc = error(f"{what} '{path}' cannot be read ({reason})")
    exc.reason = reason  # the cause alone, for callers that put it into a sentence of their own
    return exc


def _open_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "it does not exist"
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link, which is not followed here"
    return describe(exc)


def open_for_reading(
    path, *, what: str, max_bytes: int | None, error: type[DistalexError] = BadInput, follow: bool = True
) -> IO[bytes]:
    """The one place distalex opens a file to read it: a binary file object of ``path``.

    Opened ``O_RDONLY|O_NONBLOCK|O_CLOEXEC`` (``O_NOFOLLOW`` too unless ``follow``): a FIFO
    without a writer opens at once instead of blocking for ever, and ``fstat`` of what was
    opened (not of the path, which may change meanwhile) must say "regular file".  A file of
    more than ``max_bytes`` (what ``what`` can legitimately hold; None: no cap) is refused
    from its size before anything is read.  Every refusal is one ``error`` line naming
    ``what``, the path and the reason (its ``reason`` attribute holds the reason alone)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _read_refused(error, what, path, _open_reason(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise _read_refused(error, what, path, f"it is {kind}, not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise _read_refused(
                error, what, path, f"it is larger than {max_bytes} bytes ({st.st_size}), more than {what} can hold"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise _read_refused(error, what, path, describe(exc)) from None
        raise


def read_bytes(path, *, what: str, max_bytes: int, error: type[DistalexError] = BadInput, follow: bool = True) -> bytes:
    """The contents of ``path`` (see :func:`open_for_reading`), at most ``max_bytes`` of them:
    a file that grows past the cap while it is read, or that reports no size (``/proc``),
    is refused once ``max_bytes + 1`` bytes have been read, so memory stays bounded."""
    with open_for_reading(path, what=what, max_bytes=max_bytes, error=error, follow=follow) as fh:
        try:
            raw = fh.read(max_bytes + 1)
        except OSError as exc:
            raise _read_refused(error, what, path, describe(exc)) from None
    if len(raw) > max_bytes:
        raise _read_refused(error, what, path, f"it is larger than {max_bytes} bytes, more than {what} can hold")
    return raw


def reopen_path(fh: IO[bytes]) -> str:
    """A path naming the very file ``fh`` (opened by :func:`open_for_reading`) for a library
    that takes only a path: ``/proc/self/fd/N`` reopens the checked file itself, so nothing
    put under the original name since the check is read.  Without ``/proc``: the name that
    was checked a moment before."""
    proc = f"/proc/self/fd/{fh.fileno()}"
    return proc if os.path.exists(proc) else str(fh.name)


def atomic_write(path, content: Content) -> Path:
    """Write ``content`` (bytes, text, or a function that writes into a binary file) to ``path`` atomically.

    The temporary file is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (:func:`open_run_file`):
    a file or link already under its name is never written through.  A link or a special
    file under the final name is refused before anything is written (the rename would
    replace a link, not follow it, but a run file is never a link)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    kind = not_a_regular_file(path)
    if kind is not None:
        raise _refused(path, kind)
    created = False
    try:
        fd = open_run_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        created = True
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        kind = not_a_regular_file(path)
        if kind is not None:
            raise _refused(path, kind)
        os.replace(tmp, path)
    except BaseException as exc:
        if created:
            try:
                tmp.unlink()
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
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


# A run's metrics.jsonl: a row of a few hundred bytes per logged step and per epoch; a GiB is
# millions of rows, far beyond any run (a larger file is not a run's records).
RECORDS_MAX_BYTES = 1 << 30


def read_jsonl(path) -> list:
    """Rows (JSON objects) of a JSON-lines file.  A last line that does not parse is a torn
    append and is dropped; a bad line before it is a ValueError naming it.  A file that is
    not a regular file, or larger than :data:`RECORDS_MAX_BYTES`: :class:`RunDirError`."""
    raw = read_bytes(path, what="records file", max_bytes=RECORDS_MAX_BYTES, error=RunDirError)
    lines = [line for line in raw.decode("utf-8", errors="replace").split("\n") if line.strip()]
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
    fd = open_run_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    except OSError as exc:
        raise write_failed(path, exc) from None
