"""Pre-emption: SIGTERM (what cluster schedulers send before they kill a job) and SIGINT (Ctrl-C) stop training
cleanly at the end of the current step instead of killing it.

The handler only records the signal. After every step all ranks sum their "signal received" flags in one
collective, so they agree on the same step whether one rank or all of them got the signal; then every rank
saves the checkpoint for the steps done, metrics and W&B are flushed, one line is printed and the process exits
with 128 + the signal number (143 for SIGTERM, 130 for SIGINT). `--resume` continues from that checkpoint
bit-identically. Further SIGTERM/SIGINT are ignored until then: schedulers signal every process of a job and
launchers (`deepspeed`, `torchrun`) forward the signal to their workers again, so a worker typically gets two.
SIGKILL stops at once; launchers send it after their grace period (the `deepspeed` launcher: 30 s).

Before the first step and after the last one (`papo train` holds one `StopSignals` for the whole command: model
building, the warm-up, the first rollout, checkpoint writes, the final save and evaluation) the trainer calls
`check_stop` at fixed points, the same on every rank (after model building, after every warm-up step, after the
engine is built, after the final model is saved, after the final evaluation): a signal received in between stops
there, with one line saying what was saved (or that nothing was yet) and how to continue. A signal is acted on at
the next such point, so a stage longer than the launcher's grace period still ends in SIGKILL.
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


_ACTIVE: list["StopSignals"] = []  # entered and not yet left, innermost last


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT are recorded instead of acted on (main thread only).
    Nested inside another one (the CLI's), it shares that one's record instead of installing handlers."""

    def __init__(self):
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self._outer: StopSignals | None = None

    @property
    def received(self) -> int | None:
        return self._outer.received if self._outer is not None else self._received

    def __enter__(self) -> StopSignals:
        if _ACTIVE:
            self._outer = _ACTIVE[-1]
        elif threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._restore()

    def _record(self, signum: int, frame) -> None:
        if self._received is None:
            self._received = signum

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


def check_stop(stage: str, saved: str) -> None:
    """Collective when a `StopSignals` is active (every rank calls it at the same points; a no-op otherwise):
    raise Preempted("<SIGNAL> received <stage>: <saved>") if any rank received SIGTERM/SIGINT."""
    if not _ACTIVE:
        return
    signum = _ACTIVE[-1].agreed_stop()
    if signum is not None:
        raise Preempted(f"{signal.Signals(signum).name} received {stage}: {saved}", signum)
