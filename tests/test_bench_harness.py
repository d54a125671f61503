"""Unit tests of the benchmark harness: FLOP model, percentiles, presets, result files, targets, the CLI contract."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
from bench import gpu_report, memory, report, results, timing, workloads


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert timing.percentile(xs, 50) == 3.0
    assert timing.percentile(xs, 0) == 1.0 and timing.percentile(xs, 100) == 5.0
    assert timing.percentile(xs, 20) == pytest.approx(1.8)       # pos 0.8 between 1 and 2
    assert timing.percentile(xs, 80) == pytest.approx(4.2)
    assert timing.percentile([7.0], 20) == 7.0
    s = timing.summarize([4.0, 1.0, 2.0, 3.0])
    assert s == {"median": 2.5, "p20": pytest.approx(1.6), "p80": pytest.approx(3.4), "n": 4}


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        timing.percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        timing.percentile([1.0], 101)


def test_rotation_gives_each_provider_each_position():
    items = ["a", "b", "c"]
    firsts = [timing.rotation(items, r)[0] for r in range(3)]
    assert sorted(firsts) == items
    assert timing.rotation(items, 4) == ["b", "c", "a"]


def test_flop_model_values():
    case = workloads.make_case("kdrl", "qwen2.5-0.5b/1.5b", 2048, "bfloat16")
    n, d, dt, v = 2048, 896, 1536, 151936
    assert workloads.flops(case, "min") == 6 * n * d * v + 2 * n * dt * v
    assert workloads.flops(case, "recompute") == 8 * n * d * v + 2 * n * dt * v
    assert workloads.flops(case, "recompute_both") == 8 * n * d * v + 4 * n * dt * v
    grpo = workloads.make_case("grpo", "qwen2.5-0.5b/1.5b", 2048, "bfloat16")
    assert workloads.flops(grpo, "min") == 6 * n * d * v          # no teacher
    with pytest.raises(ValueError, match="FLOP model"):
        workloads.flops(case, "max")


def test_make_case_validates():
    with pytest.raises(ValueError, match="workload"):
        workloads.make_case("sft", "qwen2.5-0.5b/1.5b", 512, "float32")
    with pytest.raises(ValueError, match="model"):
        workloads.make_case("kdrl", "gpt2", 512, "float32")
    with pytest.raises(ValueError, match="multiple"):
        workloads.make_case("kdrl", "qwen2.5-0.5b/1.5b", 700, "float32")
    c = workloads.make_case("kdrl", "smollm2-135m/360m", 1024, "float32")
    assert (c.batch, c.seq_len, c.vocab) == (2, 512, 49152)


def test_default_preset_contains_the_target_case():
    pre = workloads.preset("default")
    assert any(c.workload == "kdrl" and c.vocab == 151936 and c.n_tokens >= 2048 for c in pre.cases)
    full = workloads.preset("full")
    assert {c.workload for c in full.cases} == set(workloads.WORKLOADS)
    assert {c.dtype for c in full.cases} == {"float32", "bfloat16"}
    assert len({c.vocab for c in full.cases}) >= 4 and len({c.n_tokens for c in full.cases}) >= 3
    with pytest.raises(ValueError, match="preset"):
        workloads.preset("huge")


def test_inputs_shapes_and_grad_bytes():
    case = workloads.make_case("kdrl", "smollm2-135m/360m", 512, "bfloat16")
    case = workloads.Case(**{**case.as_dict(), "d": 16, "d_t": 24, "vocab": 100})
    inp = workloads.make_inputs(case)
    assert inp.hidden.shape == (512, 16) and inp.t_weight.shape == (100, 24)
    assert inp.targets.shape == inp.mask.shape == (1, 512) and inp.advantages.shape == (1,)
    assert inp.hidden.requires_grad and not inp.t_hidden.requires_grad
    assert inp.grad_bytes() == (512 * 16 + 100 * 16) * 2


def _record(provider, t, mem, run="r1", n=2048, vocab=151936, workload="kdrl", model="qwen2.5-0.5b/1.5b",
            dtype="bfloat16"):
    return {"run_id": run, "workload": workload, "model": model, "d": 8, "d_t": 8, "vocab": vocab, "n_tokens": n,
            "dtype": dtype, "device": "cpu", "provider": provider, "time_median_s": t, "extra_peak_mb": mem,
            "speed_ok": True}


def test_ratios_and_targets():
    recs = results.add_ratios([_record("naive", 2.0, 800.0), _record("ours-kdrlloss", 1.3, 150.0),
                               _record("liger-grpo", 1.8, 300.0), _record("ours-chunked", 2.2, 120.0)])
    by = {r["provider"]: r for r in recs}
    assert by["naive"]["time_vs_naive"] == 1.0
    assert by["ours-kdrlloss"]["time_vs_naive"] == pytest.approx(0.65)
    assert by["ours-kdrlloss"]["mem_vs_naive"] == pytest.approx(150 / 800)
    (target,) = report.check_targets(recs)   # bf16 Qwen: <= 0.7x naive, <= 0.2x memory, <= 0.7x Liger
    assert target["checks"] == {"time": True, "memory": True, "peer": False}   # 1.3 / 1.8 = 0.72x Liger
    assert target["met"] is False and "MISSED" in report.targets_text([target])
    faster = results.add_ratios([dict(r, time_median_s=1.2) if r["provider"] == "ours-kdrlloss" else r
                                 for r in recs])
    assert report.check_targets(faster)[0]["met"] is True
    assert "-> met" in report.targets_text(report.check_targets(faster))
    small = results.add_ratios([_record("naive", 1.0, 1.0, n=1024), _record("ours-kdrlloss", 0.5, 0.1, n=1024)])
    assert report.check_targets(small) == []                       # N < 2048 is not a Qwen target case
    smol = [_record(p, t, m, n=512, vocab=49152, workload="rkl", model="smollm2-135m/360m")
            for p, t, m in (("naive", 1.0, 100.0), ("ours-kdrlloss", 0.9, 40.0))]
    (rkl,) = report.check_targets(results.add_ratios(smol))
    assert rkl["checks"] == {"time": True, "memory": True, "peer": None} and rkl["met"] is False  # no Liger JSD


def test_result_files_append_with_metadata(tmp_path):
    meta = results.metadata(2)
    assert meta["threads"] == 2 and meta["torch"] and meta["git_sha"]
    recs = [dict(_record("naive", 1.0, 10.0), **meta), dict(_record("ours-chunked", 0.5, 1.0), **meta)]
    results.append(recs, tmp_path)
    results.append(recs[:1], tmp_path)
    lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert lines[0].split(",") == results.FIELDS and len(lines) == 4     # one header, three rows
    loaded = results.load(tmp_path, "r1")
    assert len(loaded) == 3 and loaded[1]["provider"] == "ours-chunked" and loaded[0]["threads"] == 2
    assert results.load(tmp_path, "other") == []


def test_table_and_plots(tmp_path):
    ns = (512, 1024, 2048)
    recs = results.add_ratios([_record("naive", 2.0 * n / 512, 800.0 * n / 512, n=n) for n in ns]
                              + [dict(_record("ours-chunked", 1.0 * n / 512, 80.0, n=n), extra_peak_excl_grads_mb=40.0)
                                 for n in ns])
    text = report.table(recs)
    assert "ours-chunked" in text and "0.100" in text and "0.50" in text
    paths = report.plots(recs, tmp_path)
    names = sorted(Path(p).name for p in paths)
    assert names == ["summary_cpu.png", "sweep_n_tokens_kdrl_bfloat16_cpu_qwen2.5-0.5b.png"]
    assert all(Path(p).stat().st_size > 1000 for p in paths)
    assert report.plots(recs[:2] + recs[3:5], tmp_path / "two") == [str(tmp_path / "two" / "plots" / "summary_cpu.png")]


def test_gpu_report_text_without_rows():
    assert "not available" in gpu_report.text([], "not available (no module)")
    rows = [{"kernel": "k", "arch": 90, "registers": 128, "spill_bytes": 0}]
    out = gpu_report.text(rows)
    assert "registers" in out and "128" in out


@pytest.mark.skipif(not memory.rss_supported(), reason="needs /proc/self/clear_refs")
def test_memory_probe_sees_the_full_logits():
    """The naive step holds at least one (N, V) fp32 tensor; the probe must see it (and not a multiple of RAM)."""
    case = workloads.Case("grpo", "tiny", 64, 64, 32768, 256, 256, "float32")
    extra = memory.measure_subprocess(case, "naive")
    logits = 256 * 32768 * 4
    assert logits <= extra < 20 * logits


def test_cli_smoke_last_line_is_json(tmp_path):
    """The contract of `python bench/run.py`: a table on stdout whose last line is one JSON document."""
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--workloads", "grpo", "--providers",
           "naive", "ours-chunked", "--liger-eager", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    assert doc["preset"] == "smoke" and doc["meta"]["threads"] >= 1
    provs = {r["provider"]: r for r in doc["results"]}
    assert set(provs) == {"naive", "ours-chunked"}
    assert provs["naive"]["time_vs_naive"] == 1.0 and provs["ours-chunked"]["time_median_s"] > 0
    assert provs["naive"]["extra_peak_mb"] is not None or "not measured" in doc["memory_method"]
    assert provs["naive"]["loss"] == pytest.approx(provs["ours-chunked"]["loss"], rel=1e-4, abs=1e-5)
    assert "naive" in proc.stdout and "median ms" in proc.stdout
    assert len(results.load(tmp_path, doc["run_id"])) == 2
    assert (tmp_path / "plots" / "summary_cpu.png").exists()
    # An interrupted run resumes: recorded cases are kept, only the missing one runs.
    resume = cmd[:4] + ["grpo", "rkl", "--providers", "naive", "--no-memory", "--no-plots", "--out", str(tmp_path),
                        "--resume", doc["run_id"]]
    proc = subprocess.run(resume, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert again["run_id"] == doc["run_id"] and proc.stderr.count("first step") == 1
    assert sorted(r["workload"] for r in again["results"]) == ["grpo", "grpo", "rkl"]


def test_preset_skips_are_explicit():
    quick, default = workloads.preset("quick"), workloads.preset("default")
    target = next(c for c in default.cases if c.vocab == 151936)
    small_grpo = next(c for c in default.cases if c.workload == "grpo")
    assert default.skipped("torch-lce", target) and default.skipped("torch-lce", small_grpo)
    assert default.skipped("ours-chunked", target) and default.skipped("ours-chunked", small_grpo)
    assert not default.skipped("ours-kdrlloss", target) and not default.skipped("liger-grpo", target)
    assert quick.skipped("torch-lce", quick.cases[0]) and not quick.skipped("naive", quick.cases[0])
    assert not any(workloads.preset("full").skipped(p, c) for p in ("torch-lce", "ours-chunked")
                   for c in workloads.preset("full").cases)


@pytest.mark.triton
def test_cli_interpreter_provider_is_labelled_and_untimed(tmp_path):
    """`--smoke --interpret` runs our Triton kernels in Triton's interpreter: a loss, never a speed."""
    pytest.importorskip("triton")
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--interpret", "--workloads", "grpo",
           "--tokens", "128", "--providers", "naive", "ours-triton", "--no-memory", "--no-plots",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    provs = {r["provider"]: r for r in doc["results"]}
    interp = provs["ours-triton-interp"]
    assert interp["speed_ok"] is False and interp["time_median_s"] is None and interp["time_vs_naive"] is None
    assert interp["loss"] == pytest.approx(provs["naive"]["loss"], rel=1e-4, abs=1e-5)


def test_cli_rejects_interpret_without_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--interpret"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--smoke" in proc.stderr


def test_cli_filters_and_replacements():
    from bench import run
    plan = lambda *argv: run.plan(run.parse_args(list(argv)))[1]  # noqa: E731
    (fp32,) = plan("--workloads", "kdrl", "--models", "qwen2.5-0.5b/1.5b", "--dtypes", "float32")
    assert (fp32.vocab, fp32.n_tokens, fp32.dtype) == (151936, 2048, "float32")
    swept = plan("--quick", "--tokens", "256", "1024", "--dtypes", "float32", "bfloat16")
    assert sorted((c.n_tokens, c.dtype) for c in swept) == [(256, "bfloat16"), (256, "float32"),
                                                            (1024, "bfloat16"), (1024, "float32")]
    assert all(c.d == 64 and c.vocab == 2048 for c in plan("--smoke", "--tokens", "128"))
    with pytest.raises(SystemExit):
        plan("--smoke", "--tokens", "300")     # not a multiple of the 256-token sequences


def test_isolated_workers_give_the_in_process_loss_and_report_failures():
    """Each provider in its own process (the default on CPU) sees the same inputs as an in-process run."""
    from bench import isolated, providers
    case = workloads.preset("smoke").cases[0]
    provs = providers.select(["naive", "ours-kdrlloss"])
    inp = workloads.make_inputs(case)
    local = {p.name: timing.time_step(p, inp, case)[1] for p in provs}
    with isolated.Pool(case, provs) as pool:
        for p in provs:
            seconds, loss = pool.step(p)
            assert seconds > 0 and loss == pytest.approx(local[p.name], rel=1e-5, abs=1e-6)
        raw = timing.run_interleaved(provs, None, case, 0, 2, step=lambda p, _i, _c: pool.step(p))
        assert all(len(raw[p.name]["times"]) == 2 for p in provs)
    assert all(w.proc.poll() is not None for w in pool.workers.values())   # no worker outlives the pool
    bad = dataclasses.replace(case, workload="grpo")
    (lce,) = providers.select(["liger-jsd"])                   # liger-jsd has no grpo: its step must fail
    with isolated.Pool(bad, [lce]) as pool, pytest.raises(isolated.WorkerError):
        pool.step(lce)


def test_grad_bytes_of_a_case_match_its_inputs():
    case = workloads.preset("smoke").cases[0]
    assert workloads.grad_bytes(case) == workloads.make_inputs(case).grad_bytes()
