"""pytest-benchmark versions of the benchmark workloads at small sizes (seconds in the default suite).

Run alone with ``python -m pytest tests/test_bench_benchmarks.py --benchmark-only`` and compare runs with
pytest-benchmark's ``--benchmark-autosave`` / ``--benchmark-compare``. The real measurements are ``bench/run.py``'s;
these keep the same code paths exercised and give a quick regression signal.
"""
import math

import pytest

from bench import providers, workloads

pytest.importorskip("pytest_benchmark")

NAMES = ("naive", "ours-chunked", "ours-kdrlloss", "liger-grpo", "liger-jsd", "torch-lce")
CASES = [(w, p.name) for p in providers.select(NAMES) for w in workloads.WORKLOADS if w in p.workloads]


@pytest.mark.parametrize("workload,name", CASES)
def test_step(benchmark, workload, name):
    (prov,) = providers.select([name], liger_compiled=False)
    case = workloads.Case(workload, "small", 64, 96, 4096, 256, 128, "float32")
    reason = prov.unavailable(case)
    if reason:
        pytest.skip(reason)
    inp = workloads.make_inputs(case)
    benchmark.group = f"{workload} d=64 V=4096 N=256"
    benchmark.extra_info["flops_min"] = workloads.flops(case, "min")
    loss = benchmark.pedantic(prov.step, args=(inp, case), setup=inp.zero_grads, rounds=3, iterations=1,
                              warmup_rounds=1)
    assert inp.hidden.grad is not None and inp.weight.grad is not None
    assert math.isfinite(loss)
