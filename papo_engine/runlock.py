"""One run per output folder: rank 0 holds an exclusive lock on `<output_dir>/run.lock` for the run's lifetime.

The lock is an `fcntl.flock` on that file, which holds one JSON record: the holder's host name, pid, start time
and a heartbeat (a Unix time the holder refreshes after every step and, from a background thread, every
`HEARTBEAT_EVERY_S` seconds, so a long warm-up or model load keeps it fresh too). A second `papo train` (new or
`--resume`) on a folder whose lock is held stops with one line naming the holder, exit 2, before anything in the
folder is modified; `--resume` first waits up to `trainer.lock_wait_s` for the holder to end (a scheduler's
requeue while the old job still writes its pre-emption checkpoint). `papo eval` / `papo export` never take it.

A holder that is gone never blocks:
- on the same host, the kernel drops the flock when the holder dies (SIGKILL included); a record left behind is
  stale when its pid is no longer alive (or, for a reused pid, when its heartbeat is older than
  `STALE_AFTER_S`);
- on another host (a shared filesystem, where flock may not be honoured across machines, or may be left held by
  a client that died): the record is stale when its heartbeat is older than `STALE_AFTER_S` seconds.
A stale lock is taken over, with one line saying whose it was. Only rank 0 takes the lock; every other rank
waits for rank 0's decision (a small collective each second), so all ranks go on or refuse together.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from .config import ConfigError
from .preemption import check_stop

LOCK_NAME = "run.lock"
RECORD_BYTES = 512
HEARTBEAT_EVERY_S = 15.0
STALE_AFTER_S = 120.0  # a heartbeat older than this: the holder is gone (8 missed refreshes)
_HELD: dict[str, "RunLock"] = {}  # locks this process holds, by path (several trainers in one process share one)


class RunLocked(ConfigError):
    """Another run holds the output folder (exit 2). `main_only`: only rank 0 prints it."""
    main_only = True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _since(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None
        self.flocked = False
        self.owned = False  # the record in the file is ours (only then is it written or emptied)
        self.record: dict = {}
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------------------
    # reading the holder

    def read_holder(self) -> dict | None:
        """The record in the lock file, or None when empty / released / unreadable."""
        try:
            text = self.path.read_text().strip("\0 \n")
        except OSError:
            return None
        try:
            record = json.loads(text) if text else None
        except ValueError:
            return None
        return record if isinstance(record, dict) and "pid" in record else None

    def holder_alive(self, record: dict, flock_free: bool) -> bool:
        """Whether the run named by `record` still holds the folder (see the module docstring)."""
        fresh = time.time() - float(record.get("heartbeat", 0)) < STALE_AFTER_S
        if record.get("host") == socket.gethostname():
            if record.get("pid") == os.getpid():
                return False  # this very process (a record of a lock it released)
            return not flock_free or (_pid_alive(int(record["pid"])) and fresh)
        return fresh

    @staticmethod
    def describe(record: dict | None) -> str:
        if not record:
            return "an unknown process (the lock file holds no record yet)"
        beat = time.time() - float(record.get("heartbeat", 0))
        step = f", at step {record['step']}" if record.get("step") is not None else ""
        return (f"host {record.get('host')}, pid {record.get('pid')}, since {_since(float(record.get('started', 0)))}"
                f" (last heartbeat {beat:.0f} s ago{step})")

    # -------------------------------------------------------------------------------------------------------
    # taking it

    def try_acquire(self) -> tuple[bool, dict | None, dict | None]:
        """One attempt. Returns (acquired, holder record when refused, stale record taken over)."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock_free = True
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.ENOLCK, errno.EOPNOTSUPP,
                                 errno.ENOSYS):
                raise
            flock_free = err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # no flock on this filesystem
        record = self.read_holder()
        if record is not None and self.holder_alive(record, flock_free):
            self._unflock(flock_free)
            return False, record, None
        if record is None and not flock_free:  # held, record not written yet (the holder is just starting)
            return False, None, None
        self.flocked, self.owned = flock_free, True
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                       "step": None}
        os.ftruncate(self.fd, 0)
        self._write()
        return True, None, record

    def _unflock(self, flock_free: bool) -> None:
        if flock_free and self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass

    def _write(self) -> None:
        # one write of a fixed size, in place: a reader never sees an empty or half-replaced record
        data = (json.dumps(self.record) + "\n").ljust(RECORD_BYTES).encode()
        with self._write_lock:
            if self.fd is None or not self.owned:
                return
            os.pwrite(self.fd, data, 0)

    def heartbeat(self, step: int | None = None) -> None:
        if step is not None:
            self.record["step"] = step
        self.record["heartbeat"] = time.time()
        try:
            self._write()
        except OSError:  # a full disk must not stop training here; the next beat tries again
            pass

    def _beat_forever(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            self.heartbeat()

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat_forever, name="papo-run-lock-heartbeat", daemon=True)
            self._thread.start()

    def release(self) -> None:
        """Empty the record and drop the lock (the file stays: removing it would race with a waiter)."""
        self._stop.set()
        _HELD.pop(str(self.path.resolve()), None)
        with self._write_lock:
            if self.fd is None:
                return
            if self.owned:
                try:
                    os.ftruncate(self.fd, 0)
                except OSError:
                    pass
            self.owned = False
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _hint() -> str:
    return (f"a holder that is gone does not block: on this host it is detected by its pid, on another host by a "
            f"heartbeat older than {STALE_AFTER_S:.0f} s")


def acquire_run_lock(output_dir: Path, resume: bool, wait_s: float) -> RunLock | None:
    """Rank 0 takes the output folder's lock (waiting up to `wait_s` seconds when resuming); every rank learns
    the outcome together. Returns the lock on rank 0 (None elsewhere); raises RunLocked on every rank when the
    folder is held by another live run."""
    from . import distributed as dist_utils
    main = dist_utils.is_main()
    key = str((Path(output_dir) / LOCK_NAME).resolve())
    lock = _HELD.get(key) if main else None
    acquired = lock is not None
    if main and lock is None:
        lock = RunLock(output_dir)
    shown = f"trainer.output_dir={str(output_dir)!r}"
    deadline = time.monotonic() + (wait_s if resume else 0.0)
    announced = False
    holder = None
    while True:
        if main and not acquired:
            acquired, holder, stale = lock.try_acquire()
            if acquired and stale:
                print(f"papo: {shown}: taking over the stale lock of {lock.describe(stale)}; {_hint()}", flush=True)
            if not acquired and not announced and time.monotonic() < deadline:
                print(f"papo: {shown} is in use by {lock.describe(holder)}: waiting up to {wait_s:.0f} s "
                      f"(trainer.lock_wait_s) for it to end", flush=True)
                announced = True
        give_up = main and not acquired and time.monotonic() >= deadline
        # 0 = waiting, 1 = acquired, 2 = refused: decided by rank 0, known by all (a collective, each second)
        state = dist_utils.all_reduce_sum(float(1 if acquired else 2 if give_up else 0) if main else 0.0)
        if state == 1:
            break
        if state == 2:
            if main:
                waited = f" after waiting {wait_s:.0f} s (trainer.lock_wait_s)" if resume and wait_s > 0 else ""
                lock.release()
                raise RunLocked(f"{shown} is in use by another run: {lock.describe(holder)}{waited}; lock file "
                                f"{lock.path}. Wait for that run to end (or stop it), or set another "
                                f"trainer.output_dir; {_hint()}")
            raise RunLocked("the output folder is in use by another run (rank 0 names it)")
        check_stop(f"while waiting for {shown}", "nothing in the folder was touched; start the job again")
        time.sleep(1.0)
    if main:
        _HELD[key] = lock
        lock.start_heartbeat()
        atexit.register(lock.release)  # a clean exit leaves an empty record: the next run starts without a word
        return lock
    return None
