"""Extra peak memory of one forward+backward step.

What is counted: the peak of memory in use during the step minus the memory in use just before it, with the
inputs (hidden states, weights, targets) already allocated and no gradients present. The peak therefore includes
the gradients the step produces (dH ``(N, d)`` and dW ``(V, d)`` in the input dtype, the same for every provider)
plus everything transient (logits, softmax buffers, fp32 accumulators, compiled-kernel scratch).
We report it both including and excluding those gradient bytes; the targets use the including-everything number.

- CPU: a fresh subprocess per (case, provider), so allocations of different providers never mix. For providers
  whose first step compiles (Liger with torch.compile) it runs one warm-up step first and drops its gradients
  (others skip it: their first step allocates what every step does, and a step at the target size costs seconds).
  Then it resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` <- "5"), reads VmRSS, runs the
  measured step and reads VmHWM.
  glibc is told to serve every allocation above 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed buffers go
  back to the OS at once and a later buffer cannot hide in memory the allocator kept from the warm-up.
- CUDA: in process, ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated`` before.
"""
from __future__ import annotations

import gc
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHOD_CPU = "peak RSS delta in a subprocess (VmHWM reset via clear_refs, mmap threshold 64 KiB)"
METHOD_CUDA = "torch.cuda.max_memory_allocated delta"


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_supported() -> bool:
    """True where peak-RSS reset works (Linux with a writable /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure_cpu(provider, inp, case):
    from bench import workloads
    if provider.needs_warmup:
        # torch.compile's one-time memory is not the step's. The warm-up may run on a cheaper case that compiles
        # the same graphs (Liger GRPO compiles only the per-token loss math, whose shapes do not involve d or V).
        warm = provider.warmup_case(case)
        warm_inp = inp if warm == case else workloads.make_inputs(warm)
        provider.step(warm_inp, warm)
        warm_inp.zero_grads()
        del warm_inp
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                             # VmHWM := VmRSS
    before = _status_kb("VmRSS") * 1024
    provider.step(inp, case)
    return _status_kb("VmHWM") * 1024 - before


def measure_cuda(provider, inp, case):
    """Extra peak bytes of one step on CUDA (in process; the caching allocator's statistics are exact)."""
    import torch
    provider.step(inp, case)
    inp.zero_grads()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    provider.step(inp, case)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_subprocess(case, provider_name, liger_compiled=True, threads=None, timeout=1800):
    """Run the CPU probe for one (case, provider) in a fresh interpreter; returns extra peak bytes."""
    from bench import isolated
    proc = subprocess.run(isolated.command("bench.memory", case, provider_name, liger_compiled, threads), cwd=REPO,
                          env=isolated.environment(MALLOC_MMAP_THRESHOLD_="65536"), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {provider_name} on {case.key()} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_peak_bytes"]


def main(argv=None):
    """Probe entry point: ``python -m bench.memory --case '<json>' --provider NAME`` prints one JSON line."""
    from bench import isolated, workloads
    case, provider = isolated.child_setup(argv, __doc__.splitlines()[0])
    inp = workloads.make_inputs(case)
    extra = _measure_cpu(provider, inp, case)
    print(json.dumps({"extra_peak_bytes": extra, "grad_bytes": inp.grad_bytes()}))


if __name__ == "__main__":
    main()
