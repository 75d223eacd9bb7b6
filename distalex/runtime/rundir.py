"""The output dir a run owns: claimed before anything is read or written, checked
usable, locked for the run's lifetime, and when it may be reused.

* :func:`claim_output_dir` (main process): the dir is created if needed and must be
  a writable directory; then an exclusive ``flock`` on ``<output_dir>/.lock`` (which
  names the holder's pid and host) is taken.  A second run into the same dir is
  refused (exit 2) naming the holder.  The kernel drops the lock when its process
  dies, however it dies, so a lock left by a killed run never blocks
  ``train.resume=auto``.  Temporary files a killed writer left behind are removed.
* :func:`prepare_output_dir`: refuse a dir that holds another run unless resuming
  or ``train.overwrite``; clear it for overwrite.

Every decision is made on the main process (the only one that writes) and shared
with the other ranks, so they refuse together.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from distalex.config import TrainConfig
from distalex.errors import DistalexError, RunDirError, WriteError
from distalex.runtime.io import describe, not_a_regular_file, open_run_file, read_bytes, remove_stale_temps

RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "checkpoints")
LOCK_NAME = ".lock"


class RunDirLock:
    """An exclusive flock on ``<dir>/.lock``; ``release()`` removes the file (and the
    folders this run created, if it left them empty: a refused run leaves nothing)."""

    def __init__(self, directory: Path, fd: int | None, created: tuple = ()):
        self.directory = directory
        self.fd = fd
        self.created = created  # the folders this run made, innermost first

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still holding it: see _lock for why that is safe
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        _remove_empty(self.created)


def _usable_dir(out: Path, files=RUN_FILES, key: str = "train.output_dir") -> tuple:
    """Create ``out`` if needed; return the folders this call created.  RunDirError if unusable."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{key} '{out}' is a file, not a directory")
    created = []
    for d in (out, *out.absolute().parents):
        if d.exists():
            break
        created.append(d)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{key} '{out}' cannot be created ({describe(exc)})") from None
    for name in (*files, LOCK_NAME):
        path = out / name
        if path.is_symlink() or (name != "checkpoints" and not_a_regular_file(path) not in (None, "a directory")):
            _remove_empty(created)
            kind = "a symbolic link" if path.is_symlink() else not_a_regular_file(path)
            raise RunDirError(
                f"{key} '{out}': '{name}' is {kind}, where the run keeps its "
                f"{'checkpoints folder' if name == 'checkpoints' else 'own file'}; distalex writes nothing "
                f"through a link or into a special file (remove it, or choose another {key})"
            )
        wrong = path.is_file() if name == "checkpoints" else path.is_dir()
        if wrong:
            raise RunDirError(
                f"{key} '{out}': '{name}' is a {'file' if name == 'checkpoints' else 'directory'}, "
                f"where the run keeps its {'checkpoints folder' if name == 'checkpoints' else 'records file'}"
            )
    return tuple(created)


def _holder(path: Path) -> str:
    """Who holds the lock, from the lock file (which it writes just after taking the lock)."""
    text = ""
    for _ in range(20):
        try:
            # The lock file holds one line (pid, host, start time); a FIFO put there never blocks.
            text = read_bytes(path, what="lock file", max_bytes=4096, follow=False).decode("utf-8", "replace").strip()
        except DistalexError:
            text = ""
        if text:
            break
        time.sleep(0.05)
    return text.splitlines()[0][:200] if text else "holder unknown"


def _lock(out: Path, created: tuple, key: str = "train.output_dir") -> RunDirLock:
    """Take the lock.  The holder unlinks the file before it lets go, so a run that opened
    the old file and gets its lock after the unlink finds the path no longer names its file
    and tries again on the new one: two runs can never both hold ``.lock``."""
    path = out / LOCK_NAME
    for _ in range(100):
        try:
            fd = open_run_file(path, os.O_RDWR | os.O_CREAT)  # never through a link, never a FIFO
        except WriteError as exc:
            _remove_empty(created)
            raise RunDirError(f"{key} '{out}' is not usable: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"{key} '{out}' cannot be locked ({describe(exc)})") from None
            raise RunDirError(
                f"{key} '{out}' is in use by another run ({_holder(path)}); "
                f"wait for it to finish or choose another {key}"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        lock = RunDirLock(out, fd, created)
        try:
            info = f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError as exc:
            lock.release()
            raise RunDirError(f"{key} '{out}' is not writable ({describe(exc)})") from None
        return lock
    raise RunDirError(f"{key} '{out}': could not lock {path} (it keeps being replaced)")


def _remove_empty(folders) -> None:
    """Remove ``folders`` (innermost first) while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def claim_output_dir(train: TrainConfig, placement) -> RunDirLock:
    """Usable, locked, free of stale temporary files -- or RunDirError on every rank."""
    return claim_dir(Path(train.output_dir), placement, RUN_FILES, "train.output_dir")


def claim_dir(out: Path, placement, files, key: str) -> RunDirLock:
    """:func:`claim_output_dir` for any command's output dir: ``files`` are the names the
    command writes there, ``key`` how the user names the dir (in every message)."""
    lock, failure = RunDirLock(out, None), None
    if placement.is_main:
        try:
            lock = _lock(out, _usable_dir(out, files, key), key)
            for d in (out, out / "checkpoints"):
                remove_stale_temps(d)
        except RunDirError as exc:
            failure = exc
    if placement.any_rank(failure is not None):
        raise failure or RunDirError(f"{key} '{out}' was refused on the main process")
    return lock


def refuse_reuse(out: Path, files, overwrite: bool, key: str, placement, flag: str = "--overwrite") -> None:
    """Refuse an output dir that already holds what a command writes (``files``) unless
    ``overwrite``; with it, remove those files first, so a failure never leaves old and new
    results mixed.  Decided on the main process, shared with every rank."""
    failure = None
    if placement.is_main:
        existing = [name for name in files if (out / name).exists()]
        if existing and not overwrite:
            failure = RunDirError(f"{key} '{out}' already holds {', '.join(existing)}; pass {flag} to replace them")
        elif existing:
            for name in existing:
                (out / name).unlink()
    if placement.any_rank(failure is not None):
        raise failure or RunDirError(f"{key} '{out}' was refused on the main process")


def prepare_output_dir(train: TrainConfig, resume_path, placement, notify=print) -> None:
    """Refuse an output dir that holds another run unless resuming or ``train.overwrite``;
    clear it for overwrite.  ``train.resume=auto`` with no checkpoint yet starts afresh
    when the dir holds only the records of an attempt killed before its first checkpoint
    (what a launcher's restart finds), and says so."""
    out = Path(train.output_dir)
    failure = None
    if placement.is_main:
        try:
            _prepare(train, out, resume_path, notify)
        except RunDirError as exc:
            failure = exc
    if placement.any_rank(failure is not None):
        raise failure or RunDirError(f"train.output_dir '{out}' was refused on the main process")


def _prepare(train: TrainConfig, out: Path, resume_path, notify) -> None:
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if _is_empty_dir(out / "checkpoints"):
        existing.remove("checkpoints")
    if resume_path is not None or not existing:
        return
    unfinished_attempt = "summary.json" not in existing and "checkpoints" not in existing
    if train.overwrite or (train.resume == "auto" and unfinished_attempt):
        if not train.overwrite:
            notify(
                f"distalex: no checkpoint in {out} yet: starting from step 0 "
                f"(replacing {', '.join(existing)} of an attempt that stopped before its first checkpoint)"
            )
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    why = "no checkpoint to resume from" if train.resume == "auto" else "train.resume is unset"
    raise RunDirError(
        f"train.output_dir '{out}' already holds a run ({', '.join(existing)}; {why}); "
        f"pass train.resume=auto to continue it or train.overwrite=true to replace it"
    )


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())
