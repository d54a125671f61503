"""Child processes die with their parent, however it ends (SIGINT, SIGTERM, SIGKILL).

vLLM spawns EngineCore and Worker processes that outlive the harness when it is killed by pid. `start_watchdog()`
starts a small separate process that polls the parent pid, keeps a snapshot of the parent's descendants (from
/proc), and when the parent is gone sends SIGTERM, then SIGKILL after a grace period, to every process of the last
snapshot (orphans are reparented to init, so the snapshot is what still names them). It needs no cooperation from
the parent, so it also covers SIGKILL.

    python -m kdrl.proc --watch PID     # the watchdog itself (started by start_watchdog)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["descendants", "start_watchdog"]

_started: set[int] = set()


def _ppids() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            out[int(name)] = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def descendants(pid: int) -> set[int]:
    """Pids of all processes below pid (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for p, pp in _ppids().items():
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal_all(pids: set[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def watch(parent: int, interval: float = 0.3, grace: float = 3.0) -> None:
    me = os.getpid()
    snapshot: set[int] = set()
    while _alive(parent):
        snapshot |= descendants(parent) - {me}
        snapshot = {p for p in snapshot if _alive(p)}
        time.sleep(interval)
    _signal_all(snapshot, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_alive(p) for p in snapshot):
        time.sleep(0.1)
    _signal_all({p for p in snapshot if _alive(p)}, signal.SIGKILL)


def start_watchdog(parent: int | None = None) -> subprocess.Popen | None:
    """Start (once per parent) a watchdog that kills parent's descendants when parent ends. Linux only (/proc)."""
    parent = parent or os.getpid()
    if parent in _started or not os.path.isdir("/proc"):
        return None
    _started.add(parent)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Own session: a Ctrl-C to the terminal's process group does not kill the watchdog before it has done its job.
    return subprocess.Popen([sys.executable, "-m", "kdrl.proc", "--watch", str(parent)], env=env,
                            start_new_session=True, stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--watch":
        watch(int(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
