"""No orphans with the real vLLM engine: however `evals/run.py` ends (SIGINT, SIGTERM, SIGKILL of its pid), the
EngineCore and Worker processes it started are gone within 10 seconds (slow; needs vLLM).

    DIR/bin/python -m pytest --run-slow tests/test_evals_vllm_orphans.py    # after `setup_eval.sh --venv DIR`

tests/test_evals_proc.py checks the watchdog on a fake process tree in the default suite; this runs the real one.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kdrl.generation import vllm_available
from kdrl.proc import descendants
from test_evals_proc import _alive, sigint_default

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
              pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")]

REPO = Path(__file__).resolve().parents[1]


def _vllm_tree(pid):
    """Descendants of pid whose command line names vLLM (EngineCore, Worker) or multiprocessing children."""
    found = set()
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
            with open(f"/proc/{p}/comm", "rb") as f:
                comm = f.read()
        except OSError:
            continue
        if b"vllm" in cmd.lower() or b"multiprocessing" in cmd or b"VLLM" in comm or b"Engine" in comm:
            found.add(p)
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_engine_processes_end_with_the_harness(tmp_path, sig):
    # All of GSM8K (1,319 problems, about 7 minutes here) so that the run is still generating when the signal comes.
    cmd = [sys.executable, str(REPO / "evals" / "run.py"), "--model", "smollm2-135m-instruct", "--backend", "vllm",
           "--tasks", "gsm8k", "--max-new-tokens", "256", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=sigint_default)
    out = []  # raw chunks: vLLM's progress bar rewrites one line with carriage returns and no newline
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read1(65536), b"")), daemon=True)
    reader.start()
    text = lambda: b"".join(out).decode(errors="replace")  # noqa: E731
    try:
        deadline = time.monotonic() + 600
        # Signal once the engine generates: its progress bar is up and its processes are running.
        while time.monotonic() < deadline and proc.poll() is None and "Processed prompts" not in text():
            time.sleep(0.5)
        time.sleep(3)
        assert proc.poll() is None, text()[-4000:]
        tree = _vllm_tree(proc.pid)
        assert len(tree) >= 2, f"no vLLM EngineCore + Worker under the harness: {descendants(proc.pid)}"
        tree |= descendants(proc.pid)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        ended = time.monotonic()
        while time.monotonic() - ended < 10 and any(_alive(p) for p in tree):
            time.sleep(0.1)
        left = [p for p in tree if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
    for p in left:  # clean up before failing
        os.kill(p, signal.SIGKILL)
    assert not left, f"vLLM processes alive 10 s after the harness ended by {sig!r}: {left}"
    assert (tmp_path / "smollm2-135m-instruct_vllm_boxed_greedy_256tok" / "config.json").exists()
