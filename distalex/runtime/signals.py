"""SIGTERM/SIGINT as a flag the training loop checks between steps.

A preempted job gets SIGTERM: training goes on to the next step that is a
multiple of ``train.stop_check_every``, where every rank asks whether any rank
was signalled (:meth:`distalex.parallel.placement.Placement.any_rank`; the same steps on
every rank, so all stop after the same step), a checkpoint is written and the
run exits with 128 + the signal.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """``with GracefulStop() as stop: ... if stop.requested: ...``; the old handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> GracefulStop:
        self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
