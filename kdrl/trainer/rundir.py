"""The run directory: one writer at a time, and no run ever deleted to make room for another.

- ``<output_dir>/.lock`` is held (``fcntl.flock``) by the process that writes the run and holds its PID, host,
  start time and command line while it runs; it is emptied when the run ends. A second run into the same
  directory is refused at start, naming the first. The kernel drops a flock when its process dies (kill -9
  included), so a lock file that still names a process but is not locked is stale: it is taken over with a
  message. On a filesystem without flock the PID is checked instead (same host only; another host's lock is
  refused with the lock file's path to delete once that run is known to be over).
- Starting at step 0 (``run.resume=false``, or nothing to resume) in a directory that holds a run is refused;
  ``--fresh`` moves the old run aside to ``<output_dir>.old-<YYYYmmdd-HHMMSS>`` first, whole, by one rename.
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

from kdrl.trainer.checkpoint import list_checkpoints, newest_intact_checkpoint, remove_partial_checkpoints
from kdrl.trainer.config import ConfigError

__all__ = ["RunLock", "RUN_OUTPUTS", "run_contents", "move_aside", "open_run_dir", "LOCK_NAME"]

LOCK_NAME = ".lock"
# What a run writes at the top of its directory (kdrl/README.md lists them): --fresh moves only such directories.
RUN_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "checkpoints", "final", "curves.png", "tensorboard",
               "config_changes.jsonl", LOCK_NAME)


def _warn(message: str) -> None:
    print(f"kdrl.train: {message}", file=sys.stderr, flush=True)


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

    Raises :class:`ConfigError` naming the holder when another live process has it, or when the directory cannot
    be created or written (a file in its place, no permission).
    """

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
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
            raise ConfigError(f"run.output_dir={str(self.dir)!r} cannot be used: {what} ({err.filename})") from None
        try:
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{self.dir} is in use by another run: {_holder(self._read(fd))}; wait for it to "
                                  "end, or choose another run.output_dir") from None
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
                raise ConfigError(f"{self.dir} is locked by {_holder(old)}, another host, and this filesystem has "
                                  f"no flock to tell whether that run still writes here: if it does not, delete "
                                  f"{self.path}")
            if old.get("pid") != os.getpid() and _pid_alive(int(old.get("pid") or 0)):
                raise ConfigError(f"{self.dir} is in use by another run: {_holder(old)}; wait for it to end, or "
                                  "choose another run.output_dir")
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


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:  # in chunks: a long run's samples.jsonl is large
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def run_contents(output_dir: str | Path) -> list[str]:
    """What of a run ``output_dir`` holds, one phrase per item (``[]``: nothing, the directory may be used).

    Empty logs, the lock file and an empty ``checkpoints/`` do not count: a run killed before its first step
    leaves them. Files that are no run's output count too (and stop ``--fresh`` from moving the directory).
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name == LOCK_NAME or (name in ("metrics.jsonl", "samples.jsonl") and entry.stat().st_size == 0):
            continue
        if name.endswith(".jsonl") and entry.is_file():
            lines = _count_lines(entry)
            found.append(f"{name} ({lines} line{'' if lines == 1 else 's'})")
        elif name == "checkpoints" and entry.is_dir():
            steps = [p.name for p in list_checkpoints(out)]
            others = [p.name for p in entry.iterdir() if p.name not in steps and not p.name.startswith(".tmp-")]
            if steps or others:
                found.append(f"checkpoints/ ({', '.join(steps + others)})")
        else:
            found.append(name + ("/" if entry.is_dir() else ""))
    return found


def move_aside(output_dir: str | Path) -> Path:
    """Rename ``output_dir`` to ``<output_dir>.old-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if taken); returns it.

    Refuses (ConfigError) a directory holding files that no run writes, so a mistyped output_dir (a home or a
    source directory) is never moved.
    """
    out = Path(output_dir).resolve()
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_OUTPUTS)
    if foreign:
        raise ConfigError(f"--fresh moves a run directory aside, but {out} also holds {', '.join(foreign[:5])}"
                          f"{' ...' if len(foreign) > 5 else ''}, which no run writes: choose another run.output_dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
    try:
        os.rename(out, target)
    except OSError as err:
        raise ConfigError(f"--fresh could not move {out} aside to {target} ({err.strerror or err}): move it "
                          "yourself, or choose another run.output_dir") from None
    return target


def open_run_dir(output_dir: str | Path, *, resume: bool, fresh: bool, warn=_warn) -> tuple[RunLock, Path | None]:
    """Lock ``output_dir`` and decide where the run starts: returns the held lock and the checkpoint to resume
    from (None: step 0). Runs before any model is loaded.

    - ``fresh``: a run already there is moved aside (:func:`move_aside`) and this one starts at step 0;
    - else, with ``resume``, the newest intact checkpoint (damaged ones are reported and set aside);
    - starting at step 0 in a directory that holds a run is refused, saying what it holds and what to do.
    Leftovers of an interrupted checkpoint write (``checkpoints/.tmp-step_*``) are removed with a message.
    """
    out = Path(output_dir)
    lock = RunLock(out)
    lock.acquire(warn)
    try:
        if fresh and run_contents(out):
            aside = move_aside(out)
            lock.release()  # the old run's lock file moved with it; emptied, it marks that run as not running
            lock = RunLock(out)
            lock.acquire(warn)
            warn(f"--fresh: moved the previous run in {out} to {aside} (nothing deleted); starting at step 0")
        for tmp in remove_partial_checkpoints(out):
            warn(f"removed {tmp}: a checkpoint whose writing was interrupted (never the newest: the run continues "
                 "from the newest complete one)")
        ckpt = newest_intact_checkpoint(out, warn) if resume and not fresh else None
        held = run_contents(out) if ckpt is None else []
        if held:
            why = ("run.resume=false starts at step 0" if not resume
                   else "it has no intact checkpoint to resume from, so this run would start at step 0")
            raise ConfigError(f"{out} holds a run ({'; '.join(held)}) and {why}: pass --fresh to move that run "
                              f"aside to {out}.old-<time> and start over, or choose another run.output_dir")
    except BaseException:
        lock.release()
        raise
    return lock, ckpt
