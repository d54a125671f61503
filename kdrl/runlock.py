"""One writer per run directory: ``<dir>/.lock``, held with ``fcntl.flock`` by the process that writes the run.

Shared by the trainer (``kdrl.trainer.rundir``) and the evaluation harness (``evals/store.py``). The lock file holds
the holder's PID, host, start time and command line while it runs and is emptied when the run ends. The kernel drops
a flock when its process dies (kill -9 included), so a lock file that still names a process but is not locked is
stale: it is taken over with a message. On a filesystem without flock the PID decides on the same host; another
host's lock is refused with the path to delete. A forked child (a generation engine's worker) closes its inherited
descriptor, so it can neither keep the directory locked after its parent died nor release it early.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path

__all__ = ["RunLock", "RunLockError", "LOCK_NAME", "holder"]

LOCK_NAME = ".lock"


class RunLockError(ValueError):
    """The directory is held by another live run, or cannot be created or written; the message says which."""


def _warn(message: str) -> None:
    print(f"kdrl: {message}", file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(record: dict) -> str:
    return (f"PID {record.get('pid')} on {record.get('host')}, started {record.get('started')} "
            f"({record.get('command', '?')})")


_HELD: set[int] = set()  # descriptors of the locks this process holds


def _release(fd: int, owner: int) -> None:
    """Empty the lock file (free: no holder) and drop the flock. Also run when a Trainer is garbage-collected
    and at exit; never in a forked child (``owner`` is the PID that took the lock): the lock is its parent's."""
    if os.getpid() != owner:
        return
    _HELD.discard(fd)
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)  # closing the descriptor releases the flock


def _close_in_child() -> None:
    """A forked child (a generation engine's worker, say) shares its parent's flock through the inherited
    descriptor and would keep the directory locked after the parent died: close it there."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The lock of one run directory; :meth:`acquire` creates the directory if needed.

    Raises :class:`RunLockError` naming the holder when another live process has it, or when the directory cannot
    be created or written (a file in its place, no permission).
    """

    def __init__(self, output_dir: str | Path, hint: str = "choose another output directory"):
        self.dir = Path(output_dir)
        self.hint = hint  # the way out a refusal suggests, in the caller's words
        self.path = self.dir / LOCK_NAME
        self._finalizer = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self, warn=_warn) -> None:
        if self.held:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            what = "is not a directory" if err.errno in (errno.EEXIST, errno.ENOTDIR) else (err.strerror or err)
            raise RunLockError(f"{self.dir} cannot be used as a run directory: {what} ({err.filename})") from None
        try:
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockError(f"{self.dir} is in use by another run: {_holder(self._read(fd))}; wait for it to "
                                  f"end, or {self.hint}") from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                flocked = False  # a filesystem without flock: fall back to the PID in the file
            old = self._read(fd)
            if old:
                self._take_over(old, flocked, warn)
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "command": " ".join(sys.argv) or "python"}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        _HELD.add(fd)
        self._finalizer = weakref.finalize(self, _release, fd, os.getpid())

    def _take_over(self, old: dict, flocked: bool, warn) -> None:
        """A lock file naming a holder that does not hold the lock: say whose it was, or refuse if unsure."""
        here = socket.gethostname()
        if not flocked:
            if old.get("host") != here:
                raise RunLockError(f"{self.dir} is locked by {_holder(old)}, another host, and this filesystem has "
                                  f"no flock to tell whether that run still writes here: if it does not, delete "
                                  f"{self.path}")
            if old.get("pid") != os.getpid() and _pid_alive(int(old.get("pid") or 0)):
                raise RunLockError(f"{self.dir} is in use by another run: {_holder(old)}; wait for it to end, or "
                                  f"{self.hint}")
        warn(f"taking over the stale lock {self.path} of {_holder(old)}: that process no longer holds it (it "
             "ended without releasing it: killed or crashed)")

    @staticmethod
    def _read(fd: int) -> dict:
        raw = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return {"pid": "?", "host": "?", "started": "?", "command": f"unreadable lock file: {raw[:80]!r}"}

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()




def holder(run_dir: str | Path) -> str | None:
    """Who holds ``run_dir`` (PID, host, start, command), or None when no live process does. Reads only."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return _holder(RunLock._read(fd)) if os.pread(fd, 1, 0) else "another process"
    finally:
        os.close(fd)  # closing drops our probe's shared lock, if we got one
