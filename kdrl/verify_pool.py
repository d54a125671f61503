"""A small pool of worker processes running Math-Verify with a hard per-pair timeout.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot cancel a running task, so one hanging sympy call would
keep a worker forever. Here every worker owns a pipe; the parent waits on all pipes with a deadline and kills
(then replaces) a worker that overruns it. Workers also get an address-space limit so a huge expression fails
with MemoryError instead of swapping the machine.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import time
from multiprocessing.connection import wait

_MEMORY_LIMIT_BYTES = 4 * 1024 ** 3


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


def _worker_main(conn) -> None:
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT_BYTES, _MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # no rlimit on this platform: the timeout still bounds the damage
    # Math-Verify warns once per process that its own timeouts are off; that is deliberate here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
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
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.job: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class VerifierPool:
    """`processes` workers (default min(2, cpu count)); `verify_many` returns one bool per (pred, gold) pair."""

    def __init__(self, processes: int | None = None):
        processes = processes or min(2, os.cpu_count() or 1)
        if processes < 1:
            raise ValueError(f"VerifierPool: processes must be >= 1, got {processes}")
        methods = mp.get_all_start_methods()
        self._ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            # Import sympy/Math-Verify once in the fork server; each worker (and each replacement) forks from it.
            self._ctx.set_forkserver_preload(["kdrl.verify_pool", "math_verify", "sympy"])
        self._size = processes
        self._workers: list[_Worker] = []
        self.timeouts = 0  # pairs killed for overrunning the timeout, over the pool's life

    def _ensure_workers(self) -> None:
        self._workers = [w for w in self._workers if w.proc.is_alive()]
        while len(self._workers) < self._size:
            self._workers.append(_Worker(self._ctx))

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
        busy: dict = {}
        while todo or busy:
            for w in self._workers:
                if w.job is None and todo:
                    w.job = todo.pop()
                    w.deadline = time.monotonic() + timeout
                    w.conn.send(pairs[w.job])
                    busy[w.conn] = w
            next_deadline = min(w.deadline for w in busy.values())
            ready = wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic()))
            now = time.monotonic()
            for w in list(busy.values()):
                if w.conn in ready:
                    try:
                        results[w.job] = bool(w.conn.recv())
                    except (EOFError, OSError):  # the worker died (e.g. killed by the OS): counts as wrong
                        self._replace(w)
                elif now >= w.deadline:
                    self.timeouts += 1
                    self._replace(w)
                else:
                    continue
                del busy[w.conn]
                w.job = None
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return results

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx)

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            w.proc.join(timeout=1)
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
