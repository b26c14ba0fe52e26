"""Pre-emption: SIGTERM (what cluster schedulers send before they kill a job) and SIGINT (Ctrl-C) stop training
cleanly at the end of the current step instead of killing it.

The handler only records the signal. After every step all ranks sum their "signal received" flags in one
collective, so they agree on the same step whether one rank or all of them got the signal; then every rank
saves the checkpoint for the steps done, metrics and W&B are flushed, one line is printed and the process exits
with 128 + the signal number (143 for SIGTERM, 130 for SIGINT). `--resume` continues from that checkpoint
bit-identically. Further SIGTERM/SIGINT are ignored until then: schedulers signal every process of a job and
launchers (`deepspeed`, `torchrun`) forward the signal to their workers again, so a worker typically gets two.
SIGKILL stops at once; launchers send it after their grace period (the `deepspeed` launcher: 30 s).
"""
from __future__ import annotations

import signal
import threading

from .config import TrainingStopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(TrainingStopped):
    """Training stopped on a signal after saving a checkpoint; the process should exit with `exit_code`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT are recorded instead of acted on (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals there only
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def agreed_stop(self) -> int | None:
        """Collective (every rank calls it once per step): the signal to stop on if any rank received one —
        SIGTERM when any rank got SIGTERM, else SIGINT — or None to go on."""
        from . import distributed as dist_utils
        got_term, got_int = dist_utils.all_reduce_sums([float(self.received == signal.SIGTERM),
                                                        float(self.received == signal.SIGINT)])
        if got_term:
            return signal.SIGTERM
        return signal.SIGINT if got_int else None
