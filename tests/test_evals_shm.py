"""No shared-memory segment outlives a killed run (kdrl.proc): vLLM's processes talk through /dev/shm/psm_* segments
that only their clean shutdown unlinks. Real vLLM is not needed: a fake segment (a psm_* file held open and mapped
by a process that is then killed) stands in for them."""
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdrl import proc

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
REPO = Path(__file__).resolve().parents[1]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _ledger(shm, pid, segments, start_time=None):
    path = shm / f"{proc.LEDGER_PREFIX}{pid}.json"
    path.write_text(json.dumps({"pid": pid, "start_time": start_time, "segments": [str(s) for s in segments]}))
    return path


def test_next_start_unlinks_the_segments_of_a_dead_run_only(tmp_path):
    shm = tmp_path.resolve()
    dead_seg, live_seg, held_seg, other = (shm / f"psm_{n}" for n in ("dead01", "live01", "held01", "other1"))
    for f in (dead_seg, live_seg, held_seg, other):
        f.write_bytes(b"\0" * 4096)
    dead = _ledger(shm, _dead_pid(), [dead_seg, held_seg])
    me = os.getpid()
    live = _ledger(shm, me, [live_seg], start_time=proc._start_time(me))
    with open(held_seg, "rb"):  # a live process still holds it: it must stay
        removed = proc.cleanup_stale_segments(str(shm))
        assert removed == [str(dead_seg)]
        assert not dead_seg.exists() and held_seg.exists() and live_seg.exists() and other.exists()
        assert dead.exists()  # kept while one of its segments is still there
    assert proc.cleanup_stale_segments(str(shm)) == [str(held_seg)] and not dead.exists()
    assert live.exists() and live_seg.exists() and other.exists()
    # Our own pid with another start time: the pid was reused, the run that wrote the ledger is gone.
    _ledger(shm, me, [live_seg], start_time=1)
    assert proc.cleanup_stale_segments(str(shm)) == [str(live_seg)]


def test_held_segments_sees_open_and_mapped_files(tmp_path):
    shm = tmp_path.resolve()
    opened, mapped = shm / "psm_open01", shm / "psm_map001"
    for f in (opened, mapped):
        f.write_bytes(b"\0" * 4096)
    with open(mapped, "r+b") as f:
        m = mmap.mmap(f.fileno(), 4096)
    try:
        with open(opened, "rb"):
            assert proc.held_segments([os.getpid()], str(shm)) == {str(opened), str(mapped)}
        assert proc.held_segments([os.getpid()], str(shm)) == {str(mapped)}  # the mapping outlives the fd
    finally:
        m.close()
    assert proc.held_segments([os.getpid()], str(shm)) == set()


HOLDER = r"""
import mmap, os, sys, time
from kdrl.proc import start_watchdog
start_watchdog()
path = sys.argv[1]
with open(path, "w+b") as f:      # what multiprocessing.shared_memory does: create, size, map
    f.truncate(1 << 20)
    m = mmap.mmap(f.fileno(), 1 << 20)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.skipif(not os.path.isdir(proc.SHM_DIR), reason="no /dev/shm")
def test_watchdog_unlinks_the_segments_of_a_sigkilled_run():
    seg = Path(proc.SHM_DIR) / f"psm_kdrltest{os.getpid()}"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(seg)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    ledger = Path(proc.SHM_DIR) / f"{proc.LEDGER_PREFIX}{child.pid}.json"
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20  # the watchdog scans every 2 s
        while time.monotonic() < deadline and not (ledger.exists() and str(seg) in ledger.read_text()):
            time.sleep(0.1)
        assert ledger.exists(), "the watchdog never recorded the segment"
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (seg.exists() or ledger.exists()):
            time.sleep(0.1)
        assert not seg.exists(), "the segment outlived the SIGKILLed run"
        assert not ledger.exists()
    finally:
        if child.poll() is None:
            child.kill()
        for f in (seg, ledger):
            if f.exists():
                f.unlink()
