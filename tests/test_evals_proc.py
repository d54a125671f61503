"""kdrl.proc watchdog: a fake process tree (child that spawns a grandchild) dies with its parent on SIGINT,
SIGTERM and SIGKILL of the parent (the vLLM backend's EngineCore/Worker orphan problem)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PARENT = r"""
import subprocess, sys, time
from kdrl.proc import start_watchdog
start_watchdog()
grandchild = "import time\nwhile True: time.sleep(1)"
child = ("import subprocess, sys, time\n"
         f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
         "while True: time.sleep(1)")
subprocess.Popen([sys.executable, "-c", child])
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def sigint_default():
    """Popen preexec_fn: a suite started in the background inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt; the process under test must see the SIGINT a user's Ctrl-C sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_descendants_die_with_parent(sig):
    from kdrl.proc import descendants
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=env,
                              preexec_fn=sigint_default)
    assert parent.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # watchdog + child + grandchild
        tree = descendants(parent.pid)
        if len(tree) >= 3:
            break
        time.sleep(0.1)
    time.sleep(1.0)  # let the watchdog take a snapshot with the grandchild in it
    tree = descendants(parent.pid)
    assert len(tree) >= 3, tree
    parent.send_signal(sig)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.1)
    left = [p for p in tree if _alive(p)]
    for p in left:  # clean up before failing
        os.kill(p, signal.SIGKILL)
    assert not left, f"descendants still alive 10 s after {sig!r}: {left}"
