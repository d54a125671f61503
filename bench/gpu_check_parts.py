"""The measured parts of the GPU check; ``bench/gpu_check.py`` runs each in its own process under a time cap.

    python -m bench.gpu_check_parts PART --out DIR [--smoke] [--cap-s SECONDS]

PART is one of ``PARTS`` (accuracy, speed, liger, tiles). A part appends one JSON object per line to
``DIR/parts/PART.jsonl`` as soon as each figure is measured: a part killed at its cap keeps what it had finished.
The first line is ``{"kind": "meta", ...}`` (machine and versions), the last ``{"kind": "done"}``. Rows:

- accuracy: every op on every backend against float64, in bf16 (Qwen2.5 0.5B/1.5B heads) and in fp32 (the
  kernels' ieee-dot variants). Per quantity the max error of ours, of plain torch in bf16 (full bf16 logits) and of
  torch in fp32, and the verdict ``|ours - gt| <= |torch in the input dtype - gt| + tol`` elementwise, with the
  test suite's tolerances (tests/_triton_interp_worker.py).
- speed: the KDRL step (forward + backward) of naive PyTorch, KDRLLoss on the PyTorch backend (single pass) and
  KDRLLoss on Triton at each token count: median time, TFLOP/s (useful and executed FLOP models), and on CUDA the
  ``max_memory_allocated`` delta of one step.
- liger: Liger's chunked GRPO (compiled) on the same steps, when ``liger_kernel`` is importable. Its own process:
  in one process a torch.compile'd provider slowed the eager ones that ran after it (bench/isolated.py).
- tiles: the tile configuration each Triton kernel launches with.
The accuracy part ends with the registers and spill bytes of every kernel it compiled (``{"kind": "compiled"}``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# acc_n: tokens of the accuracy part; ref_chunk: rows per piece of its float64 reference (see _float64_ref).
FULL = dict(acc_n=4096, ref_chunk=1024, d=896, d_t=1536, vocab=151936, speed_tokens=(4096, 16384), warmup=2, repeats=10)
SMOKE = dict(acc_n=37, ref_chunk=16, d=40, d_t=24, vocab=203, speed_tokens=(64,), warmup=0, repeats=1)
TEMPERATURE = 0.7
# tol = atol * max|gt| + rtol * |gt| elementwise, on top of torch's own error in the input dtype (as in the tests)
TOLS = {"bf16": (4e-3, 8e-3), "fp32": (1e-5, 1e-5)}
PARTS = ("accuracy", "speed", "liger", "tiles")


class Part:
    """Row sink of one part: appends JSON lines and knows how much of its time cap is left."""

    def __init__(self, path: Path, cap_s: float):
        self.path, self.start, self.cap_s = path, time.perf_counter(), cap_s
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, **row):
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")  # default=str: a Triton constexpr wrapper, say

    def time_left(self) -> float:
        return self.cap_s - (time.perf_counter() - self.start)


def _meta(torch, device):
    triton = importlib.util.find_spec("triton") and __import__("triton")
    liger = importlib.util.find_spec("liger_kernel")
    return dict(device=device, device_name=torch.cuda.get_device_name() if device == "cuda"
                else f"cpu ({platform.processor() or platform.machine()})",
                python=platform.python_version(), torch=torch.__version__,
                triton=triton.__version__ if triton else "not installed",
                liger="installed" if liger else "not installed",
                interpreter=os.environ.get("TRITON_INTERPRET", "0"),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def _error_text(err):
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


# --- accuracy -----------------------------------------------------------------------------------------------------
def _errors(ours, gt, bf16, fp32, dtype_name):
    """Max errors against float64 and the verdict of the tolerance rule (against torch in the input dtype)."""
    ours, gt, bf16, fp32 = (x.detach().double() for x in (ours, gt, bf16, fp32))
    low = bf16 if dtype_name == "bf16" else fp32
    atol, rtol = TOLS[dtype_name]
    tol = atol * gt.abs().max().clamp_min(1e-30) + rtol * gt.abs()
    excess = float(((ours - gt).abs() - (low - gt).abs() - tol).max()) if gt.numel() else 0.0
    err = (lambda x: float((x - gt).abs().max()) if gt.numel() else 0.0)  # noqa: E731
    finite = bool(ours.isfinite().all())  # a nan would otherwise slip through the max() comparisons
    return {"ours": err(ours), "torch_bf16": err(bf16), "torch_fp32": err(fp32), "excess": excess,
            "pass": finite and excess <= 0}


def _inputs(torch, n, d, d_t, vocab, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):  # drawn on the CPU (reproducible anywhere), in the target dtype
        return torch.empty(*shape, dtype=dtype).normal_(0.0, scale, generator=gen).to(device)
    return dict(h=randn(n, d), w=randn(vocab, d, scale=2.0 / d ** 0.5), th=randn(n, d_t),
                tw=randn(vocab, d_t, scale=2.0 / d_t ** 0.5),
                tgt=torch.randint(0, vocab, (n,), generator=gen).to(device),
                g1=torch.randn(n, generator=gen).to(device), g2=torch.randn(n, generator=gen).to(device))


def _grads(torch, fn, *leaves, dtype=None):
    """``(outputs, grads)`` of ``fn(*leaves)`` with fresh leaf copies that require grad.

    ``dtype=torch.float64`` makes float64 leaves, so that the ground truth's gradients are not rounded back to the
    inputs' bf16 on their way out of autograd; other references keep the input dtype (as a user's parameters)."""
    xs = [x.detach().to(dtype or x.dtype, copy=True).requires_grad_(True) for x in leaves]
    outs, loss = fn(*xs)
    grads = torch.autograd.grad(loss, xs)
    return [o.detach() for o in outs], list(grads)


def _leaf_dtype(torch, dtype):
    return torch.float64 if dtype == torch.float64 else None


def _accuracy_groups(torch, x, backends):
    """``(op, quantity names, reference(dtype[, rows]), {backend: ours}, row-separable)`` per op; each callable
    returns a _grads pair. A row-separable reference takes ``rows`` (a slice of tokens) too (see _float64_ref)."""
    from kdrl_kernels import fused_linear_kl, fused_linear_logprobs, reference

    def ref_logprobs(dtype, rows=slice(None)):
        def fn(h, w):
            logp, ent, lse = reference.reference_logprobs(h, w, x["tgt"][rows], temperature=TEMPERATURE,
                                                          dtype=dtype)
            return (logp, ent, lse), ((logp * x["g1"][rows].to(logp.dtype)).sum()
                                      + (ent * x["g2"][rows].to(ent.dtype)).sum())
        return _grads(torch, fn, x["h"][rows], x["w"], dtype=_leaf_dtype(torch, dtype))

    def ours_logprobs(backend):
        def fn(h, w):
            logp, ent, lse = fused_linear_logprobs(h, w, x["tgt"], temperature=TEMPERATURE, backend=backend,
                                                   return_entropy=True, return_lse=True)
            return (logp, ent, lse), (logp * x["g1"]).sum() + (ent * x["g2"]).sum()
        return _grads(torch, fn, x["h"], x["w"])

    yield ("fused_linear_logprobs", ("logp", "entropy", "lse", "grad_hidden", "grad_weight"), ref_logprobs,
           {b: (lambda b=b: ours_logprobs(b)) for b in backends}, True)
    for kind in ("reverse", "forward", "jsd"):
        def ref_kl(dtype, rows=slice(None), kind=kind):
            def fn(h, w):
                kl = reference.reference_kl(h, w, x["th"][rows], x["tw"], kind=kind, beta=0.5,
                                            temperature=TEMPERATURE, dtype=dtype)
                return (kl,), (kl * x["g1"][rows].to(kl.dtype)).sum()
            return _grads(torch, fn, x["h"][rows], x["w"], dtype=_leaf_dtype(torch, dtype))

        def ours_kl(backend, kind=kind):
            def fn(h, w):
                kl = fused_linear_kl(h, w, x["th"], x["tw"], kind=kind, beta=0.5, temperature=TEMPERATURE,
                                     backend=backend)
                return (kl,), (kl * x["g1"]).sum()
            return _grads(torch, fn, x["h"], x["w"])
        yield (f"fused_linear_kl[{kind}]", ("kl", "grad_hidden", "grad_weight"), ref_kl,
               {b: (lambda b=b, ours_kl=ours_kl: ours_kl(b)) for b in backends}, True)
    yield _loss_group(torch, x, backends)


def _loss_group(torch, x, backends, beta=0.02):
    """KDRLLoss (KDRL, k2, token mean, on-policy) against the same objective computed from reference log-probs.

    All N tokens form one sequence (B = 1), so the token mean spans the whole batch."""
    from kdrl_kernels import KDRLConfig, KDRLLoss, objectives as O, reference
    n = x["h"].shape[0]
    adv = x["g1"][:1].float()
    mask = torch.ones(1, n, dtype=torch.bool, device=x["h"].device)

    def ref(dtype):
        def fn(h, w):
            s = reference.reference_logprobs(h, w, x["tgt"], temperature=TEMPERATURE, dtype=dtype)[0].view(1, -1)
            with torch.no_grad():
                t = reference.reference_logprobs(x["th"], x["tw"], x["tgt"], temperature=TEMPERATURE,
                                                 dtype=dtype)[0].view(1, -1)
            per = (O.clipped_surrogate(s - s.detach(), adv[:, None].to(s.dtype).expand_as(s))
                   + beta * O.kl_estimator(s, t, "k2"))
            loss = O.aggregate(per, mask, "token_mean")
            return (loss.reshape(1),), loss
        return _grads(torch, fn, x["h"], x["w"], dtype=_leaf_dtype(torch, dtype))

    def ours(backend):
        fn_loss = KDRLLoss(KDRLConfig(objective="kdrl", kl_estimator="k2", beta=beta, temperature=TEMPERATURE,
                                      compute_entropy=False, backend=backend))

        def fn(h, w):
            loss, _ = fn_loss(h.view(1, n, -1), w, x["tgt"].view(1, -1), mask, advantages=adv,
                              teacher_hidden=x["th"].view(1, n, -1), teacher_weight=x["tw"])
            return (loss.reshape(1),), loss
        return _grads(torch, fn, x["h"], x["w"])
    # the token mean couples all rows: its reference is not split (about 17 GB in float64 at N = 4096)
    return "KDRLLoss[kdrl,k2]", ("loss", "grad_hidden", "grad_weight"), ref, \
        {b: (lambda b=b: ours(b)) for b in backends}, False


def _float64_ref(torch, ref, n, chunk):
    """``ref(float64)`` in row chunks: outputs and grad_hidden concatenated, grad_weight summed in float64.

    Rows are independent in these ops, so this is the same ground truth in a fraction of the memory: the float64
    jsd reference holds about 14 MB per token (measured on CPU at V = 151,936), 58 GB at N = 4096 in one piece."""
    outs, grad_h, grad_w = [], [], None
    for i in range(0, n, chunk):
        (o, (gh, gw)) = ref(torch.float64, slice(i, min(i + chunk, n)))
        outs.append(o)
        grad_h.append(gh)
        grad_w = gw if grad_w is None else grad_w + gw
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))], [torch.cat(grad_h), grad_w]


def accuracy(torch, part, shape, device, backends):
    """bf16 first (the headline dtype), then fp32; one error row instead of a group that raises."""
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        x = _inputs(torch, shape["acc_n"], shape["d"], shape["d_t"], shape["vocab"], device, dtype)
        for op, names, ref, ours, separable in _accuracy_groups(torch, x, backends):
            base = dict(kind="accuracy", op=op, dtype=dtype_name, n=shape["acc_n"])
            if part.time_left() < 10:
                part.write(**base, backend="-", skipped="time cap reached before this group")
                continue
            try:
                gt = _float64_ref(torch, ref, shape["acc_n"], shape["ref_chunk"]) if separable \
                    else ref(torch.float64)
                refs = [gt, ref(torch.bfloat16), ref(torch.float32)]
            except Exception as err:  # e.g. out of memory in the float64 reference: the other groups still run
                part.write(**base, backend="-", error=f"reference: {_error_text(err)}")
                _free(torch, device)
                continue
            for backend, fn in ours.items():
                start = time.perf_counter()
                try:
                    got = fn()
                except Exception as err:
                    part.write(**base, backend=backend, error=_error_text(err))
                    _free(torch, device)
                    continue
                flat = [outs + grads for outs, grads in (got, *refs)]
                for i, name in enumerate(names):
                    part.write(**base, backend=backend, quantity=name,
                               **_errors(flat[0][i], flat[1][i], flat[2][i], flat[3][i], dtype_name),
                               seconds=round(time.perf_counter() - start, 3))
            del refs
            _free(torch, device)
        del x
        _free(torch, device)
    if "triton" in backends:
        compiled_kernels(part)


_COMPILED_KEYS = ("KIND", "BLOCK_N", "BLOCK_V", "BLOCK_D", "HAS_GENT", "HAS_MASK", "PRECISION", "S_PRECISION")


def compiled_kernels(part):
    """Registers and spills of every Triton kernel this process compiled, read from the JIT caches (what ptxas did
    on this machine, to hold against the ahead-of-time report). Nothing under the interpreter, which compiles none."""
    from kdrl_kernels.triton import kl, logprobs
    fns = [logprobs._logprobs_fwd_kernel, logprobs._logprobs_bwd_hidden_kernel, logprobs._logprobs_bwd_weight_kernel,
           kl._kl_fwd_kernel, kl._kl_bwd_hidden_kernel, kl._kl_bwd_weight_kernel]
    for fn in fns:
        for caches in getattr(fn, "device_caches", {}).values():
            for compiled in caches[0].values():
                try:
                    src, md = compiled.src, compiled.metadata
                    names = {(i,): n for i, n in enumerate(fn.arg_names)}
                    consts = {names.get(k, str(k)): v for k, v in src.constants.items()}
                    first_ptr = next(v for k, v in src.signature.items() if k.endswith("_ptr"))
                    part.write(kind="compiled", kernel=compiled.name, input=first_ptr,
                               **{k: consts[k] for k in _COMPILED_KEYS if k in consts},
                               num_warps=md.num_warps, num_stages=md.num_stages, shared_bytes=md.shared,
                               registers=compiled.n_regs, spill_bytes=compiled.n_spills)
                except Exception as err:  # a Triton whose internals differ: say so, keep the rest
                    part.write(kind="compiled", kernel=getattr(compiled, "name", "?"), error=_error_text(err))


def _free(torch, device):
    if device == "cuda":
        torch.cuda.empty_cache()


# --- speed --------------------------------------------------------------------------------------------------------
def _step_rows(torch, part, provs, shape, device):
    """Median step time, TFLOP/s and extra peak memory of the KDRL step per provider and token count."""
    from bench import memory, timing, workloads
    for n in shape["speed_tokens"]:
        case = dataclasses.replace(workloads.make_case("kdrl", "qwen2.5-0.5b/1.5b", n, "bfloat16", device),
                                   d=shape["d"], d_t=shape["d_t"], vocab=shape["vocab"], seq_len=min(n, 512))
        inp = workloads.make_inputs(case)
        for p in provs:
            row = dict(kind="speed", provider=p.name, n_tokens=n)
            why = p.unavailable(case)
            if why or part.time_left() < 15:
                part.write(**row, skipped=why or "time cap reached before this provider")
                continue
            try:
                for _ in range(max(shape["warmup"], 1)):
                    timing.time_step(p, inp, case)
                times = [timing.time_step(p, inp, case)[0] for _ in range(shape["repeats"])]
                med = timing.summarize(times)["median"]
                executed = p.flop_model_for(case)
                row.update(median_s=med, repeats=len(times), tflops_useful=workloads.flops(case, "min") / med / 1e12,
                           tflops_executed=workloads.flops(case, executed) / med / 1e12, flop_model=executed)
                if device == "cuda":
                    row["extra_peak_mb"] = memory.measure_cuda(p, inp, case) / 2**20
            except Exception as err:  # report and go on: one provider must not sink the whole check
                row["error"] = _error_text(err)
            inp.zero_grads()
            part.write(**row)
            _free(torch, device)
        del inp
        _free(torch, device)


def speed(torch, part, shape, device, backends):
    from bench import providers
    provs = providers.select(["naive"])
    provs += [providers.OursKDRLLoss(b, f"kdrlloss-{'single-pass' if b == 'torch' else b}") for b in backends]
    _step_rows(torch, part, provs, shape, device)


def liger(torch, part, shape, device, backends):
    from bench import providers
    if importlib.util.find_spec("liger_kernel") is None:
        part.write(kind="speed", provider="liger-grpo", skipped="liger-kernel is not installed")
        return
    _step_rows(torch, part, providers.select(["liger-grpo"]), shape, device)


def tiles(torch, part, shape, device, backends):
    if "triton" not in backends:
        part.write(kind="tiles", skipped="triton is not installed")
        return
    from kdrl_kernels.triton._common import CONFIGS
    for (kernel, size), cfg in CONFIGS.items():
        part.write(kind="tiles", kernel=kernel, dtype="bf16" if size == 2 else "fp32", **dataclasses.asdict(cfg))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=PARTS)
    ap.add_argument("--out", required=True, help="report folder; rows go to OUT/parts/PART.jsonl")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--cap-s", type=float, default=600.0, help="stop starting new measurements near this time")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
    part = Part(Path(args.out) / "parts" / f"{args.part}.jsonl", args.cap_s)
    import torch
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        ap.error("no CUDA device: this check needs an NVIDIA GPU and a CUDA torch (or --smoke for the CPU run)")
    backends = ("triton", "torch") if importlib.util.find_spec("triton") else ("torch",)
    part.write(kind="meta", **_meta(torch, device), backends=list(backends), smoke=args.smoke,
               shape={k: v for k, v in (SMOKE if args.smoke else FULL).items()})
    globals()[args.part](torch, part, SMOKE if args.smoke else FULL, device, backends)
    part.write(kind="done", seconds=round(time.perf_counter() - part.start, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
