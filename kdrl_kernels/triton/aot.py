"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, with a resource report. Needs no GPU.

    python -m kdrl_kernels.triton.aot            # table
    python -m kdrl_kernels.triton.aot --json     # one JSON document

Each kernel is compiled with the launch configuration the launchers use (``_common.CONFIGS``) for bf16 and fp32
inputs. The cubin is inspected with the ``cuobjdump`` shipped in the Triton wheel: registers and stack bytes from
``--dump-resource-usage``; spills as LDL/STL (local-memory) instructions in the SASS; tensor-core use as HMMA
(sm_80 and sm_90) and HGMMA (sm_90 warpgroup MMA) instructions. Shared memory is Triton's dynamic allocation
(``metadata.shared``). If cuobjdump cannot run, the PTX is inspected instead (``mma.sync``/``wgmma`` instructions
only: registers and spills are then unknown) and the ``source`` field says so.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import kl, logprobs
from ._common import default_config, dot_precision

_LOWPREC = {"h_ptr", "w_ptr", "b_ptr", "sh_ptr", "sw_ptr", "sb_ptr", "th_ptr", "tw_ptr", "tb_ptr"}
_POINTER_TYPES = {"tgt_ptr": "*i64", "mask_ptr": "*u8"}
_UNIT_STRIDES = {"stride_hd", "stride_wd", "s_hd", "s_wd", "t_hd", "t_wd"}  # contiguous rows: the JIT specialises 1
_FLOATS = {"inv_temp", "beta"}
_ALIGNED_INTS = {"D", "DT", "stride_hn", "stride_wv", "s_hn", "s_wv", "t_hn", "t_wv"}  # multiples of 16 in practice
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# (report name, kernel, key of _common.CONFIGS, constexpr flags). lm_heads have no bias; the KL kernels take a mask.
_KL_FLAGS = dict(HAS_SBIAS=False, HAS_TBIAS=False, HAS_MASK=True)
KERNELS = [
    ("logprobs_fwd", logprobs._logprobs_fwd_kernel, "logprobs_fwd", dict(HAS_BIAS=False)),
    ("logprobs_bwd_hidden", logprobs._logprobs_bwd_hidden_kernel, "logprobs_bwd", dict(HAS_BIAS=False, HAS_GENT=True)),
    ("logprobs_bwd_weight", logprobs._logprobs_bwd_weight_kernel, "logprobs_bwd", dict(HAS_BIAS=False, HAS_GENT=True)),
    ("kl_fwd[reverse]", kl._kl_fwd_kernel, "kl_fwd", dict(KIND=0, **_KL_FLAGS)),
    ("kl_fwd[jsd]", kl._kl_fwd_kernel, "kl_fwd", dict(KIND=2, **_KL_FLAGS)),
    ("kl_bwd_hidden[reverse]", kl._kl_bwd_hidden_kernel, "kl_bwd", dict(KIND=0, **_KL_FLAGS)),
    ("kl_bwd_hidden[jsd]", kl._kl_bwd_hidden_kernel, "kl_bwd", dict(KIND=2, **_KL_FLAGS)),
    ("kl_bwd_weight[reverse]", kl._kl_bwd_weight_kernel, "kl_bwd", dict(KIND=0, **_KL_FLAGS)),
    ("kl_bwd_weight[jsd]", kl._kl_bwd_weight_kernel, "kl_bwd", dict(KIND=2, **_KL_FLAGS)),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_source(fn, dtype: torch.dtype, flags: dict, block_meta: dict) -> triton.compiler.ASTSource:
    """An ASTSource with the signature, constexprs and divisibility hints a JIT launch would produce."""
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compile needs TRITON_INTERPRET unset when kdrl_kernels.triton is imported")
    precision = dot_precision(dtype)
    constexprs = dict(flags, **block_meta, PRECISION=precision, S_PRECISION=precision, T_PRECISION=precision)
    signature, consts, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name], consts[name] = "constexpr", constexprs[name]
        elif name in _UNIT_STRIDES:
            signature[name], consts[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            absent = (name in ("b_ptr", "sb_ptr") and not flags.get("HAS_BIAS", flags.get("HAS_SBIAS", True))) or \
                     (name == "tb_ptr" and not flags.get("HAS_TBIAS", True)) or \
                     (name == "gent_ptr" and not flags.get("HAS_GENT", True)) or \
                     (name == "mask_ptr" and not flags.get("HAS_MASK", True))
            if absent:  # a None argument is specialised away by the JIT
                signature[name], consts[name] = "constexpr", None
                continue
            elem = _TRITON_TYPES[dtype] if name in _LOWPREC else None
            signature[name] = f"*{elem}" if elem else _POINTER_TYPES.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in _ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def _cuobjdump() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def inspect_binary(compiled) -> dict:
    """Registers, stack bytes, spill instructions and tensor-core instruction counts of one compiled kernel."""
    tool = _cuobjdump()
    if tool is not None:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernel.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True)
            sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True)
        match = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
        if usage.returncode == 0 and sass.returncode == 0 and match:
            count = lambda op: len(re.findall(rf"\b{op}[.\s]", sass.stdout))  # noqa: E731
            return dict(source="sass", registers=int(match.group(1)), stack_bytes=int(match.group(2)),
                        spill_instructions=count("LDL") + count("STL"), hmma=count("HMMA"), hgmma=count("HGMMA"))
    # Registers and spills are decided by ptxas, after PTX: unknown here.
    ptx = compiled.asm["ptx"]
    return dict(source="ptx", registers=None, stack_bytes=None, spill_instructions=None,
                hmma=len(re.findall(r"\bmma\.sync", ptx)), hgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)))


def compile_one(name, fn, config_key, flags, dtype_name, arch, config=None) -> dict:
    """Compile one kernel for one arch; ``config`` (a KernelConfig) overrides the launchers' default."""
    dtype = DTYPES[dtype_name]
    cfg = config or default_config(config_key, dtype)
    block = dict(BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D)
    start = time.perf_counter()
    compiled = triton.compile(build_source(fn, dtype, flags, block), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    seconds = time.perf_counter() - start
    info = inspect_binary(compiled)
    precision = dot_precision(dtype) if dtype == torch.float32 else "native"  # tl.dot's input_precision: fp32 only
    return dict(kernel=name, arch=f"sm_{arch}", dtype=dtype_name, precision=precision,
                **block, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                shared_bytes=int(compiled.metadata.shared), **info,
                tensor_cores=bool(info["hmma"] or info["hgmma"]), compile_s=round(seconds, 2))


def compile_report(archs=(80, 90), dtypes=("bf16", "fp32"), kernels=None, progress=False) -> list[dict]:
    """Compile every kernel for every arch and dtype; one dict per compile (see the module docstring)."""
    selected = [k for k in KERNELS if kernels is None or k[0] in kernels]
    jobs = [(k, d, a) for k in selected for d in dtypes for a in archs]
    rows = []
    for i, ((name, fn, config_key, flags), dtype_name, arch) in enumerate(jobs, 1):
        rows.append(compile_one(name, fn, config_key, flags, dtype_name, arch))
        if progress:
            print(f"[{i}/{len(jobs)}] {name} {dtype_name} sm_{arch}: {rows[-1]['compile_s']} s", file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["kernel", "arch", "dtype", "tile (N,V,D)", "warps/stages", "regs", "stack B", "LDL+STL", "smem B",
            "HMMA", "HGMMA", "tensor cores"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        dtype = r["dtype"] if r["precision"] == "native" else f"{r['dtype']} ({r['precision']})"
        vals = [r["kernel"], r["arch"], dtype,
                f"{r['BLOCK_N']},{r['BLOCK_V']},{r['BLOCK_D']}", f"{r['num_warps']}/{r['num_stages']}",
                r["registers"], r["stack_bytes"], r["spill_instructions"], r["shared_bytes"], r["hmma"], r["hgmma"],
                "yes" if r["tensor_cores"] else "no"]
        lines.append("| " + " | ".join("n/a" if v is None else str(v) for v in vals) + " |")
    sources = sorted({r["source"] for r in rows})
    lines.append(f"\nInspected: {', '.join(sources)} ('sass' = cuobjdump from the triton wheel; 'ptx' = fallback).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 90)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--kernel", nargs="+", default=None, choices=[k[0] for k in KERNELS])
    args = parser.parse_args(argv)
    rows = compile_report(tuple(args.arch), tuple(args.dtype), args.kernel, progress=True)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
