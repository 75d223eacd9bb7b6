"""Every error distalex reports to a user, and the exit status it stands for.

The CLI maps a :class:`DistalexError` to its ``exit_code`` in one place
(:func:`distalex.cli.main`); nothing else decides exit statuses.

* :class:`BadInput` (exit 2): the run was refused before it wrote anything -- a
  config key or value, the world size, the data, a checkpoint, the output dir.
* :class:`RunFailure` (exit 1): the run started and failed (a non-finite loss,
  a full disk, a data file that changed during the run); what it wrote before
  the failure is kept.
* :class:`Interrupted` (exit 128 + signal): SIGTERM/SIGINT stopped the run
  after it wrote a checkpoint (or, Ctrl-C outside the training steps, before it began).
"""

from __future__ import annotations

import signal


class DistalexError(Exception):
    """Base of the errors a user sees as one line (``distalex: error: ...``)."""

    exit_code = 1
    label = "error"
    # Printed by every process, not only the main one: for errors a process finds before it
    # has joined its job (then no other process can speak for it).
    every_process = False


class BadInput(DistalexError):
    """Bad input: nothing was written or overwritten (exit status 2)."""

    exit_code = 2


class ConfigError(BadInput, ValueError):
    """A config value is unknown, mistyped or impossible, or the world size does not fit it."""


class LaunchError(ConfigError):
    """The launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, ...) is malformed,
    inconsistent or left from another job (distalex/runtime/launcher.py)."""

    every_process = True  # which process is the main one is what is in doubt


class ModelSpecError(ConfigError):
    """The requested network cannot be built (width, towers or image size)."""


class DataError(BadInput):
    """Data missing, corrupt or unusable."""


class CheckpointError(BadInput):
    """A checkpoint is missing, unreadable, unsafe or for a different network."""


class RunDirError(BadInput):
    """``train.output_dir`` cannot be used by this run."""


class UsageError(BadInput):
    """A command-line argument is missing, unknown or invalid (an unknown export format, say)."""


class OutputError(BadInput):
    """An output file a command would write exists (and ``--overwrite`` was not given) or cannot be made."""


class RefusedOnRank(DistalexError):
    """A start-up check failed on another rank (a file one node cannot read, say): every rank
    raises this or that rank's own error, so the main process prints the reason once, naming
    the rank, with that error's exit status (:meth:`distalex.parallel.placement.Placement.check_together`)."""

    def __init__(self, rank: int, message: str, exit_code: int):
        super().__init__(f"{message} (found on rank {rank})")
        self.rank, self.exit_code = rank, exit_code


class RunFailure(DistalexError):
    """The run failed after it started; earlier checkpoints and records are kept (exit status 1)."""


class RendezvousFailure(RunFailure):
    """The job's processes could not meet (MASTER_ADDR:MASTER_PORT refused or silent)."""

    every_process = True


class WriteError(RunFailure):
    """A run file could not be written (a full disk, a quota, a read-only or failing file system)."""


class NonFiniteLoss(RunFailure):
    """The loss or the weights became NaN/inf."""


class DataFailure(RunFailure):
    """A data file that passed the start-up check could not be read during the run
    (it changed or went away meanwhile): the run fails, its checkpoints are kept."""


class ExportFailure(RunFailure):
    """An exported model does not reproduce the reference model's outputs; nothing is kept."""


class Interrupted(DistalexError):
    """SIGTERM/SIGINT: the step finished and a checkpoint was written (exit status 128 + signal)."""

    label = "stopped"

    def __init__(self, signum: int, path, note: str | None = None):
        name = signal.Signals(signum).name
        where = f"checkpoint {path}" if path else "no checkpoint written"
        super().__init__(f"stopped by {name}; " + (note or f"{where}; continue with train.resume=auto"))
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum
