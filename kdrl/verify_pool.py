"""A small pool of worker processes running Math-Verify with a hard per-pair timeout.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot cancel a running task, so one hanging sympy call would
keep a worker forever. Here every worker owns a pipe; the parent waits on all pipes with a deadline and kills
(then replaces) a worker that overruns it. Workers also get an address-space limit so a huge expression fails
with MemoryError instead of swapping the machine.

Workers are fresh interpreters (`subprocess`, POSIX) that import only this module, not `multiprocessing`
children: spawn and forkserver children re-import the caller's main script, so a script calling `grade_many`
without an `if __name__ == "__main__":` guard would run again in every worker (and fail starting workers of its
own). A worker reports ready once Math-Verify is imported and warm; only then does the per-pair timeout count.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait

_MEMORY_LIMIT_BYTES = 4 * 1024 ** 3
_STARTUP_TIMEOUT = 120.0  # seconds for a new worker to import sympy and Math-Verify and verify one pair
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the directory holding the kdrl package
# The worker's whole program: our package first on sys.path, the current directory ("") off it.
_BOOT = ("import sys; sys.path[:] = [{root!r}] + [p for p in sys.path if p]; "
         "from kdrl.verify_pool import _child_main; _child_main(int(sys.argv[1]))")


def _wrap(answer: str) -> str:
    """Give Math-Verify's LaTeX extractor the whole answer as one boxed expression."""
    return "\\boxed{" + answer.strip().strip("$").strip() + "}"


def verify_pair(pred: str, gold: str) -> bool:
    """Math-Verify equivalence of two extracted answers, in the current process, with its signal timeouts off.

    Only `LatexExtractionConfig` is used: `ExprExtractionConfig` parses with `sympy.parse_expr` (Python eval).
    """
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig()]
    gold_parsed = parse(_wrap(gold), extraction_config=config, parsing_timeout=None)
    pred_parsed = parse(_wrap(pred), extraction_config=config, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))  # gold first: verify is not symmetric


def _child_main(fd: int) -> None:
    """Entry point of a worker process: serve (pred, gold) pairs on the socket `fd` until None or EOF."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT_BYTES, _MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # no rlimit on this platform: the timeout still bounds the damage
    # Math-Verify warns once per process that its own timeouts are off; that is deliberate here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Before "ready", so the parent's per-pair timeout excludes them: the imports, and one pair, since the first
    # parse builds Math-Verify's LaTeX parser (0.3 s here, 100x a later pair: several seconds on a loaded machine).
    verify_pair("x + 1", "1 + x")
    conn = Connection(fd)
    conn.send("ready")
    _worker_main(conn)


def _worker_main(conn) -> None:
    while True:
        try:
            item = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if item is None:
            return
        pred, gold = item
        try:
            ok = verify_pair(pred, gold)
        except BaseException:  # noqa: BLE001 - any failure to verify (incl. MemoryError, RecursionError) is "wrong"
            ok = False
        conn.send(ok)


class _Worker:
    """One worker process and its socket; `deadline` is the startup deadline until `ready`, then the job's."""

    def __init__(self):
        parent, child = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT.format(root=_ROOT), str(child.fileno())],
                                     pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        self.conn = Connection(parent.detach())
        self.ready = False
        self.job: int | None = None
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()


class VerifierPool:
    """`processes` workers (default min(2, cpu count)); `verify_many` returns one bool per (pred, gold) pair."""

    def __init__(self, processes: int | None = None):
        processes = processes or min(2, os.cpu_count() or 1)
        if processes < 1:
            raise ValueError(f"VerifierPool: processes must be >= 1, got {processes}")
        self._size = processes
        self._workers: list[_Worker] = []
        self.timeouts = 0  # pairs killed for overrunning the timeout, over the pool's life

    def _ensure_workers(self) -> None:
        for w in self._workers:
            if not w.alive():
                w.kill()
        self._workers = [w for w in self._workers if w.alive()]
        while len(self._workers) < self._size:
            self._workers.append(_Worker())

    def verify_many(self, pairs: list[tuple[str, str]], *, timeout: float = 3.0, progress=False) -> list[bool]:
        results = [False] * len(pairs)
        if not pairs:
            return results
        self._ensure_workers()
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(pairs), desc=progress if isinstance(progress, str) else "verify", leave=False)
        todo = list(range(len(pairs)))[::-1]
        while todo or any(w.job is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.job is None and todo:
                    w.job = todo.pop()
                    w.deadline = time.monotonic() + timeout
                    w.conn.send(pairs[w.job])
            waiting = [w for w in self._workers if w.job is not None or not w.ready]
            next_deadline = min(w.deadline for w in waiting)
            ready = wait([w.conn for w in waiting], timeout=max(0.0, next_deadline - time.monotonic()))
            now = time.monotonic()
            for w in waiting:
                if not w.ready:
                    if w.conn in ready:
                        self._started(w)
                    elif now >= w.deadline:
                        raise RuntimeError(f"VerifierPool: a Math-Verify worker did not start within "
                                           f"{_STARTUP_TIMEOUT:.0f} s")
                    continue
                if w.conn in ready:
                    try:
                        results[w.job] = bool(w.conn.recv())
                    except (EOFError, OSError):  # the worker died (e.g. killed by the OS): counts as wrong
                        w = self._replace(w)
                elif now >= w.deadline:
                    self.timeouts += 1
                    w = self._replace(w)
                else:
                    continue
                w.job = None
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return results

    @staticmethod
    def _started(worker: _Worker) -> None:
        """Read a new worker's "ready"; a worker that exits first (say Math-Verify missing) is a hard error."""
        try:
            worker.ready = worker.conn.recv() == "ready"
        except (EOFError, OSError):
            worker.ready = False
        if not worker.ready:
            worker.kill()
            raise RuntimeError(f"VerifierPool: a Math-Verify worker exited while starting (exit code "
                               f"{worker.proc.returncode}); its error is printed above")

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill `worker` and start a fresh one in its place; returns the new one (job None, not ready yet)."""
        worker.kill()
        fresh = _Worker()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            try:
                w.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SHARED: VerifierPool | None = None


def shared_pool() -> VerifierPool:
    """The process-wide pool used by `kdrl.grading.grade_many` by default (closed at exit)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = VerifierPool()
        atexit.register(_SHARED.close)
    return _SHARED
