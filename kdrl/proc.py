"""Child processes die with their parent, however it ends (SIGINT, SIGTERM, SIGKILL).

vLLM spawns EngineCore and Worker processes that outlive the harness when it is killed by pid. `start_watchdog()`
starts a small separate process that polls the parent pid, keeps a snapshot of the parent's descendants (from
/proc), and when the parent is gone sends SIGTERM, then SIGKILL after a grace period, to every process of the last
snapshot (orphans are reparented to init, so the snapshot is what still names them). It needs no cooperation from
the parent, so it also covers SIGKILL.

Shared memory: vLLM's processes talk through POSIX shared-memory segments (`/dev/shm/psm_*`, hundreds of MiB) that
only their own clean shutdown unlinks, so every killed run used to leave them behind. The watchdog also records which
such segments the parent and its descendants hold (open or mapped), in a ledger file next to them
(`/dev/shm/kdrl-psm-<pid>.json`: same lifetime as the segments, gone at reboot), and when the parent is gone and its
processes are ended, unlinks those that no live process holds any more. Should the watchdog itself not get to
that (killed too, machine overloaded), `cleanup_stale_segments()`, called at the next start, does the same for
every ledger whose process is gone.

    python -m kdrl.proc --watch PID     # the watchdog itself (started by start_watchdog)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

__all__ = ["descendants", "start_watchdog", "held_segments", "unlink_unheld", "cleanup_stale_segments",
           "stop_descendants"]

_started: set[int] = set()
_watchdogs: set[int] = set()  # pids of the watchdogs this process started (stop_descendants spares them)

SHM_DIR = "/dev/shm"
SHM_PREFIX = "psm_"  # Python's multiprocessing.shared_memory names, which vLLM's message queues use
LEDGER_PREFIX = "kdrl-psm-"


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


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, it names one
    process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


# --- shared-memory segments ---------------------------------------------------------------------------------------
def held_segments(pids, shm_dir: str = SHM_DIR, prefix: str = SHM_PREFIX) -> set[str]:
    """Paths of the `shm_dir/prefix*` files that any of `pids` has open or mapped (from /proc/PID/fd and maps).
    Processes we may not read are skipped."""
    root = os.path.realpath(shm_dir) + "/"
    found: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(root + prefix):
                    found.add(target.removesuffix(" (deleted)"))
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(root + prefix)
                    if i >= 0:
                        found.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            continue
    return found


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def unlink_unheld(paths, shm_dir: str = SHM_DIR, prefix: str = SHM_PREFIX, spare: set[int] = frozenset()) -> list[str]:
    """Unlink those of `paths` that still exist and that no live process (other than the pids in `spare`) holds;
    returns the paths unlinked. Only our own files (same uid) are touched."""
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        return []
    held = held_segments([p for p in _all_pids() if p not in spare], shm_dir, prefix)
    gone = []
    for p in paths:
        try:
            if p in held or os.stat(p).st_uid != os.getuid():
                continue
            os.unlink(p)
            gone.append(p)
        except OSError:
            continue
    return gone


def _ledger(parent: int, shm_dir: str) -> str:
    return os.path.join(shm_dir, f"{LEDGER_PREFIX}{parent}.json")


def _write_ledger(parent: int, segments: set[str], shm_dir: str) -> None:
    path = _ledger(parent, shm_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": parent, "start_time": _start_time(parent), "segments": sorted(segments)}, f)
    os.replace(tmp, path)


def cleanup_stale_segments(shm_dir: str = SHM_DIR, prefix: str = SHM_PREFIX) -> list[str]:
    """For every ledger in `shm_dir` whose process is gone (pid dead, or reused by another process), unlink the
    listed segments that no live process holds, then the ledger. Returns the paths unlinked. Called at start."""
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(shm_dir) if n.startswith(LEDGER_PREFIX) and n.endswith(".json")]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(shm_dir, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(path) as f:
                led = json.load(f)
            pid, start = int(led["pid"]), led.get("start_time")
            segments = [s for s in led.get("segments", []) if os.path.dirname(s) == os.path.realpath(shm_dir)
                        and os.path.basename(s).startswith(prefix)]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a ledger being written (or not ours): leave it
        if _alive(pid) and (start is None or _start_time(pid) == start):
            continue  # its run is still going
        removed += unlink_unheld(segments, shm_dir, prefix)
        if not any(os.path.exists(s) for s in segments):
            try:
                os.unlink(path)
            except OSError:
                pass
    return removed


def watch(parent: int, interval: float = 0.3, grace: float = 3.0, shm_dir: str = SHM_DIR,
          scan_every: float = 2.0) -> None:
    """Until `parent` ends: snapshot its descendants (every `interval` s) and the shared-memory segments they hold
    (every `scan_every` s, into the ledger). Then end the snapshot's processes (SIGTERM, SIGKILL after `grace`)
    and unlink the recorded segments that nothing holds any more."""
    me = os.getpid()
    snapshot: set[int] = set()
    segments: set[str] = set()
    shm = os.path.isdir(shm_dir)
    next_scan = 0.0
    while _alive(parent):
        snapshot |= descendants(parent) - {me}
        snapshot = {p for p in snapshot if _alive(p)}
        if shm and time.monotonic() >= next_scan:
            found = held_segments(snapshot | {parent}, shm_dir)
            if not found <= segments:
                segments |= found
                try:
                    _write_ledger(parent, segments, shm_dir)
                except OSError:
                    pass
            next_scan = time.monotonic() + scan_every
        time.sleep(interval)
    _signal_all(snapshot, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_alive(p) for p in snapshot):
        time.sleep(0.1)
    _signal_all({p for p in snapshot if _alive(p)}, signal.SIGKILL)
    if segments:
        end = time.monotonic() + grace  # a SIGKILLed process's mappings go when the kernel has reaped it
        while time.monotonic() < end and any(_alive(p) for p in snapshot):
            time.sleep(0.1)
        unlink_unheld(segments, shm_dir)
        if not any(os.path.exists(s) for s in segments):
            try:
                os.unlink(_ledger(parent, shm_dir))
            except OSError:
                pass


def stop_descendants(grace: float = 3.0, shm_dir: str = SHM_DIR) -> list[str]:
    """End this process's descendants now (SIGTERM, then SIGKILL after `grace` s), sparing the watchdogs, and unlink
    the shared-memory segments they or this process hold that no other process holds (this process is about to
    exit: the interrupt path). Returns the segments unlinked. After it returns, no child can print any more."""
    me = os.getpid()
    kids = descendants(me) - _watchdogs
    for w in _watchdogs:
        kids -= descendants(w)
    segments = held_segments(kids | {me}, shm_dir) if os.path.isdir(shm_dir) else set()
    _signal_all(kids, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_alive(p) for p in kids):
        time.sleep(0.05)
    _signal_all({p for p in kids if _alive(p)}, signal.SIGKILL)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_alive(p) for p in kids):
        time.sleep(0.05)
    return unlink_unheld(segments, shm_dir, spare={me}) if segments else []


def start_watchdog(parent: int | None = None) -> subprocess.Popen | None:
    """Start (once per parent) a watchdog that kills parent's descendants when parent ends. Linux only (/proc)."""
    parent = parent or os.getpid()
    if parent in _started or not os.path.isdir("/proc"):
        return None
    _started.add(parent)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cleanup_stale_segments()  # what earlier killed runs left, if their watchdogs could not clean up
    # Own session: a Ctrl-C to the terminal's process group does not kill the watchdog before it has done its job.
    proc = subprocess.Popen([sys.executable, "-m", "kdrl.proc", "--watch", str(parent)], env=env,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    _watchdogs.add(proc.pid)
    return proc


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--watch":
        watch(int(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
