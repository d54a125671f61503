"""One-command GPU proof: accuracy of every Triton kernel and of KDRLLoss against float64, then speed and memory.

    bash bench/gpu_check.sh                 # on a machine with an NVIDIA GPU and a CUDA torch (< 8 minutes)
    bash bench/gpu_check.sh --smoke         # tiny shapes on CPU under TRITON_INTERPRET=1 (what the tests run)

Writes ``<out>/gpu_check.md`` and ``<out>/gpu_check.json`` (default ``bench/results/gpu_check/``) and prints both
paths. Sections:

1. Accuracy at Qwen2.5 0.5B/1.5B heads (d = 896, d_t = 1536, V = 151,936), N = 4096, bf16, random upstream
   gradients, temperature 0.7: ``fused_linear_logprobs`` (log-prob, entropy, logsumexp, dH, dW),
   ``fused_linear_kl`` (reverse, forward, jsd; value, dH, dW) on the Triton and the PyTorch backends, and
   ``KDRLLoss`` (KDRL k2 step: loss, dH, dW) on both. Each quantity reports the max error of ours, of plain torch
   in bf16 (full bf16 logits) and of torch in fp32 (upcast full logits) against float64, and passes when
   ``|ours - gt| <= |torch_bf16 - gt| + tol`` elementwise (the rule of the test suite).
2. Speed and memory of the KDRL step at N = 4096 and 16,384: naive PyTorch, KDRLLoss on the PyTorch backend
   (single pass), KDRLLoss on Triton, Liger's chunked GRPO (compiled); median forward+backward time over timed
   repeats after warm-up, TFLOP/s under the minimum FLOP model ``6NdV + 2N d_t V`` and under the executed one,
   and the ``max_memory_allocated`` delta of one step.
3. The tile configuration each Triton kernel ran with.
Under ``--smoke`` the shapes are tiny and the timings only prove that the code path runs (they are labelled so).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FULL = dict(n=4096, d=896, d_t=1536, vocab=151936, speed_tokens=(4096, 16384), warmup=2, repeats=10)
SMOKE = dict(n=37, d=40, d_t=24, vocab=203, speed_tokens=(64,), warmup=0, repeats=1)
TEMPERATURE = 0.7
# tol = ATOL * max|gt| + RTOL * |gt| elementwise on top of torch-bf16's own error (as tests/_triton_interp_worker.py)
ATOL, RTOL = 4e-3, 8e-3


def _errors(ours, gt, bf16, fp32):
    """Max errors against float64 and the verdict of the tolerance rule."""
    ours, gt, bf16, fp32 = (x.detach().double() for x in (ours, gt, bf16, fp32))
    tol = ATOL * gt.abs().max().clamp_min(1e-30) + RTOL * gt.abs()
    excess = float(((ours - gt).abs() - (bf16 - gt).abs() - tol).max()) if gt.numel() else 0.0
    err = (lambda x: float((x - gt).abs().max()) if gt.numel() else 0.0)
    return {"ours": err(ours), "torch_bf16": err(bf16), "torch_fp32": err(fp32), "excess": excess,
            "pass": excess <= 0}


def _inputs(torch, n, d, d_t, vocab, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=torch.bfloat16)
    return dict(h=randn(n, d), w=randn(vocab, d, scale=2.0 / d ** 0.5), th=randn(n, d_t),
                tw=randn(vocab, d_t, scale=2.0 / d_t ** 0.5),
                tgt=torch.randint(0, vocab, (n,), generator=gen).to(device),
                g1=torch.randn(n, generator=gen).to(device), g2=torch.randn(n, generator=gen).to(device))


def _grads(torch, fn, *leaves):
    """``(outputs, grads)`` of ``fn(*leaves)`` with fresh leaf copies that require grad."""
    xs = [x.detach().clone().requires_grad_(True) for x in leaves]
    outs, loss = fn(*xs)
    grads = torch.autograd.grad(loss, xs)
    return [o.detach() for o in outs], list(grads)


def _rows(op, backend, names, ours, gt, bf16, fp32):
    """One accuracy row per quantity; each of ours/gt/bf16/fp32 is an ``(outputs, grads)`` pair of :func:`_grads`."""
    flat = [outs + grads for outs, grads in (ours, gt, bf16, fp32)]
    return [dict(op=op, backend=backend, quantity=name, **_errors(*(f[i] for f in flat)))
            for i, name in enumerate(names)]


def accuracy(torch, shape, device, backends):
    """Every op on every backend against float64, with torch in bf16 and fp32 as the comparison rows."""
    from kdrl_kernels import fused_linear_kl, fused_linear_logprobs, reference
    x = _inputs(torch, shape["n"], shape["d"], shape["d_t"], shape["vocab"], device)
    rows = []

    def ref_logprobs(dtype):
        def fn(h, w):
            logp, ent, lse = reference.reference_logprobs(h, w, x["tgt"], temperature=TEMPERATURE, dtype=dtype)
            return (logp, ent, lse), ((logp * x["g1"].to(logp.dtype)).sum() + (ent * x["g2"].to(ent.dtype)).sum())
        return _grads(torch, fn, x["h"], x["w"])

    gt, bf16, fp32 = ref_logprobs(torch.float64), ref_logprobs(None), ref_logprobs(torch.float32)
    for backend in backends:
        def ours(h, w):
            logp, ent, lse = fused_linear_logprobs(h, w, x["tgt"], temperature=TEMPERATURE, backend=backend,
                                                   return_entropy=True, return_lse=True)
            return (logp, ent, lse), (logp * x["g1"]).sum() + (ent * x["g2"]).sum()
        rows += _rows("fused_linear_logprobs", backend, ("logp", "entropy", "lse", "grad_hidden", "grad_weight"),
                      _grads(torch, ours, x["h"], x["w"]), gt, bf16, fp32)
    for kind in ("reverse", "forward", "jsd"):
        def ref_kl(dtype):
            def fn(h, w):
                kl = reference.reference_kl(h, w, x["th"], x["tw"], kind=kind, beta=0.5, temperature=TEMPERATURE,
                                            dtype=dtype)
                return (kl,), (kl * x["g1"].to(kl.dtype)).sum()
            return _grads(torch, fn, x["h"], x["w"])
        gt, bf16, fp32 = ref_kl(torch.float64), ref_kl(None), ref_kl(torch.float32)
        for backend in backends:
            def ours(h, w):
                kl = fused_linear_kl(h, w, x["th"], x["tw"], kind=kind, beta=0.5, temperature=TEMPERATURE,
                                     backend=backend)
                return (kl,), (kl * x["g1"]).sum()
            rows += _rows(f"fused_linear_kl[{kind}]", backend, ("kl", "grad_hidden", "grad_weight"),
                          _grads(torch, ours, x["h"], x["w"]), gt, bf16, fp32)
    rows += _loss_accuracy(torch, x, backends)
    return rows


def _loss_accuracy(torch, x, backends, beta=0.02):
    """KDRLLoss (KDRL, k2, token mean, on-policy) on each backend against the same objective in float64.

    All N tokens form one sequence (B = 1), so the token mean spans the whole batch.
    """
    from kdrl_kernels import KDRLConfig, KDRLLoss, objectives as O, reference
    n = x["h"].shape[0]
    b = 1
    adv = x["g1"][:b].float()
    mask = torch.ones(b, n, dtype=torch.bool, device=x["h"].device)

    def ref(dtype):
        def fn(h, w):
            s = reference.reference_logprobs(h, w, x["tgt"], temperature=TEMPERATURE, dtype=dtype)[0]
            with torch.no_grad():
                t = reference.reference_logprobs(x["th"], x["tw"], x["tgt"], temperature=TEMPERATURE,
                                                 dtype=dtype)[0]
            s, t = s.view(b, -1), t.view(b, -1)
            per = (O.clipped_surrogate(s - s.detach(), adv[:, None].to(s.dtype).expand_as(s))
                   + beta * O.kl_estimator(s, t, "k2"))
            loss = O.aggregate(per, mask, "token_mean")
            return (loss.reshape(1),), loss
        return _grads(torch, fn, x["h"], x["w"])

    gt, bf16, fp32 = ref(torch.float64), ref(None), ref(torch.float32)
    rows = []
    for backend in backends:
        fn_loss = KDRLLoss(KDRLConfig(objective="kdrl", kl_estimator="k2", beta=beta, temperature=TEMPERATURE,
                                      compute_entropy=False, backend=backend))

        def ours(h, w):
            loss, _ = fn_loss(h.view(b, n // b, -1), w, x["tgt"].view(b, -1), mask, advantages=adv,
                              teacher_hidden=x["th"].view(b, n // b, -1), teacher_weight=x["tw"])
            return (loss.reshape(1),), loss
        rows += _rows("KDRLLoss[kdrl,k2]", backend, ("loss", "grad_hidden", "grad_weight"),
                      _grads(torch, ours, x["h"], x["w"]), gt, bf16, fp32)
    return rows


def speed(torch, shape, device, backends):
    """Median step time, TFLOP/s and peak memory of the KDRL step per provider and token count."""
    from bench import memory, providers, timing, workloads
    provs = providers.select(["naive"])
    provs += [providers.OursKDRLLoss(b, f"kdrlloss-{'single-pass' if b == 'torch' else b}") for b in backends]
    liger = providers.select(["liger-grpo"])[0]
    rows = []
    for n in shape["speed_tokens"]:
        case = dataclasses.replace(workloads.make_case("kdrl", "qwen2.5-0.5b/1.5b", n, "bfloat16", device),
                                   d=shape["d"], d_t=shape["d_t"], vocab=shape["vocab"],
                                   seq_len=min(n, 512))
        inp = workloads.make_inputs(case)
        for p in provs + ([liger] if liger.unavailable(case) is None else []):
            row = dict(provider=p.name, n_tokens=n)
            try:
                for _ in range(max(shape["warmup"], 1)):
                    timing.time_step(p, inp, case)
                times = [timing.time_step(p, inp, case)[0] for _ in range(shape["repeats"])]
                med = timing.summarize(times)["median"]
                executed = p.flop_model_for(case)
                row.update(median_s=med, tflops_useful=workloads.flops(case, "min") / med / 1e12,
                           tflops_executed=workloads.flops(case, executed) / med / 1e12, flop_model=executed)
                if device == "cuda":
                    row["extra_peak_mb"] = memory.measure_cuda(p, inp, case) / 2**20
            except Exception as err:  # report and go on: one provider must not sink the whole check
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            inp.zero_grads()
            rows.append(row)
        del inp
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def tile_configs(backends):
    if "triton" not in backends:
        return {}
    from kdrl_kernels.triton._common import CONFIGS
    return {f"{kernel} ({'bf16' if size == 2 else 'fp32'})": dataclasses.asdict(cfg)
            for (kernel, size), cfg in CONFIGS.items()}


def markdown(doc):
    m = doc["meta"]
    lines = [f"# GPU check ({'smoke, interpreter: not speeds' if doc['smoke'] else 'full'})", "",
             f"{m['device_name']} | torch {m['torch']} | triton {m['triton']} | {m['date']} | "
             f"{doc['elapsed_s']:.0f} s | shapes d={doc['shape']['d']} d_t={doc['shape']['d_t']} "
             f"V={doc['shape']['vocab']} N={doc['shape']['n']} bf16, temperature {TEMPERATURE}", "",
             f"**Accuracy: {'all pass' if doc['accuracy_pass'] else 'FAILURES'}** "
             "(max |x - float64|; pass: |ours - gt| <= |torch_bf16 - gt| + tol elementwise)", "",
             "| op | backend | quantity | ours | torch bf16 | torch fp32 | pass |", "|---|---|---|---:|---:|---:|---|"]
    for r in doc["accuracy"]:
        lines.append(f"| {r['op']} | {r['backend']} | {r['quantity']} | {r['ours']:.2e} | {r['torch_bf16']:.2e} | "
                     f"{r['torch_fp32']:.2e} | {'yes' if r['pass'] else 'NO'} |")
    lines += ["", "## KDRL step: time and memory" + (" (smoke: proves the path runs, not a speed)"
                                                     if doc["smoke"] else ""), "",
              "| N | provider | median ms | TFLOP/s useful | TFLOP/s executed | extra peak MB |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in doc["speed"]:
        if "error" in r:
            lines.append(f"| {r['n_tokens']} | {r['provider']} | failed: {r['error']} | | | |")
            continue
        mem = f"{r['extra_peak_mb']:.0f}" if r.get("extra_peak_mb") is not None else "-"
        lines.append(f"| {r['n_tokens']} | {r['provider']} | {1e3 * r['median_s']:.2f} | {r['tflops_useful']:.1f} | "
                     f"{r['tflops_executed']:.1f} | {mem} |")
    lines += ["", "## Tile configurations", "", "| kernel | BLOCK_N | BLOCK_V | BLOCK_D | warps | stages |",
              "|---|---:|---:|---:|---:|---:|"]
    for k, c in doc["tile_configs"].items():
        lines.append(f"| {k} | {c['BLOCK_N']} | {c['BLOCK_V']} | {c['BLOCK_D']} | {c['num_warps']} | "
                     f"{c['num_stages']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check"))
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
    import torch
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        ap.error("no CUDA device: this check needs an NVIDIA GPU and a CUDA torch (or --smoke for the CPU run)")
    start = time.perf_counter()
    shape = SMOKE if args.smoke else FULL
    try:
        import triton
        triton_version = triton.__version__
        backends = ("triton", "torch")
    except ImportError:
        triton_version, backends = "not installed", ("torch",)
    print(f"gpu check: {'smoke' if args.smoke else 'full'} on {device}, backends {backends}", file=sys.stderr)
    acc = accuracy(torch, shape, device, backends)
    print(f"accuracy: {sum(r['pass'] for r in acc)}/{len(acc)} pass ({time.perf_counter() - start:.0f} s)",
          file=sys.stderr)
    spd = speed(torch, shape, device, backends)
    meta = dict(device_name=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor()})",
                torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                interpreter=os.environ.get("TRITON_INTERPRET", "0"))
    doc = dict(smoke=args.smoke, device=device, shape={k: v for k, v in shape.items() if k != "speed_tokens"},
               meta=meta, accuracy=acc, accuracy_pass=all(r["pass"] for r in acc), speed=spd,
               tile_configs=tile_configs(backends), elapsed_s=time.perf_counter() - start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
    (out / "gpu_check.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} ({doc['elapsed_s']:.0f} s)")
    return 0 if doc["accuracy_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
