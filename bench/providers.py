"""Providers: one implementation of the benchmark workloads each, behind one small interface.

``provider.unavailable(case)`` says why a provider cannot run a case (None when it can) and
``provider.step(inputs, case)`` runs one forward + backward, leaving dH and dW in ``inputs.hidden.grad`` /
``inputs.weight.grad`` and returning the loss as a float. ``flop_model_for(case)`` names the FLOP model of
``workloads.FLOP_MODELS`` the provider actually executes (recompute or not), so achieved GFLOP/s can be reported
both as useful work (the minimum model, the same for all) and as executed work.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch
import torch.nn.functional as F

from . import naive


def _seq(x, case):
    """``(N, ...)`` -> ``(B, T, ...)`` view (Liger and KDRLLoss take per-sequence layouts)."""
    return x.view(case.batch, case.seq_len, *x.shape[1:])


class Provider:
    name = "?"
    label = "?"
    workloads = ()
    flop_model = {}
    speed_ok = True      # False: results are correctness/smoke only and never enter speed tables
    needs_warmup = False  # True: the first step does one-time work (torch.compile) the memory probe must skip

    def flop_model_for(self, case) -> str:
        """The FLOP model this provider executes on ``case`` (a key of ``workloads.FLOP_MODELS``)."""
        return self.flop_model[case.workload]

    def warmup_case(self, case):
        """The case whose first step does this provider's one-time work for ``case`` (see ``needs_warmup``)."""
        return case

    def unavailable(self, case):
        if case.workload not in self.workloads:
            return f"{self.name} does not implement {case.workload}"
        return None

    def step(self, inp, case) -> float:
        loss = self.loss(inp, case)
        loss.backward()
        return float(loss.detach())

    def loss(self, inp, case):
        raise NotImplementedError


class Naive(Provider):
    name, label = "naive", "naive PyTorch, full (N, V) logits, fp32 log-softmax"
    workloads = ("kdrl", "grpo", "rkl")
    flop_model = {"kdrl": "min", "grpo": "min", "rkl": "min"}

    def loss(self, inp, case):
        if case.workload == "kdrl":
            return naive.kdrl_loss(inp.hidden, inp.weight, inp.t_hidden, inp.t_weight, inp.targets, inp.mask,
                                   inp.advantages, inp.beta, inp.eps_low, inp.eps_high)
        if case.workload == "grpo":
            return naive.grpo_loss(inp.hidden, inp.weight, inp.targets, inp.mask, inp.advantages,
                                   inp.eps_low, inp.eps_high)
        return naive.reverse_kl_loss(inp.hidden, inp.weight, inp.t_hidden, inp.t_weight, inp.mask)


def _objective_from_logprobs(s, t, inp, workload):
    """KDRL / GRPO token-mean loss from per-token log-probs with the library's own objective functions."""
    from kdrl_kernels import objectives as O
    s = s.view_as(inp.mask)
    adv = inp.advantages[:, None].expand_as(s)
    per_token = O.clipped_surrogate(O.grpo_log_ratio(s, s.detach()), adv, inp.eps_low, inp.eps_high)
    if workload == "kdrl":
        per_token = per_token + inp.beta * O.kl_estimator(s, t.view_as(s), "k2")
    return O.aggregate(per_token, inp.mask, "token_mean")


class OursOps(Provider):
    """The public ops (``fused_linear_logprobs`` / ``fused_linear_kl``) under autograd, objectives on top."""
    workloads = ("kdrl", "grpo", "rkl")
    # Both backends keep only per-row statistics and recompute logits in backward (the KL backward recomputes
    # the teacher's too).
    FLOP_MODEL = {"kdrl": "recompute", "grpo": "recompute", "rkl": "recompute_both"}

    def __init__(self, backend="torch"):
        self.backend = backend
        self.name = f"ours-{'chunked' if backend == 'torch' else backend}"
        self.label = f"kdrl_kernels ops, backend={backend!r}, autograd"
        self.flop_model = self.FLOP_MODEL
        self.interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        self.speed_ok = not self.interpreted
        if self.interpreted:
            self.name, self.label = "ours-triton-interp", self.label + " under TRITON_INTERPRET=1 (not a speed)"

    def unavailable(self, case):
        reason = super().unavailable(case)
        if reason or self.backend == "torch":
            return reason
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if case.device != "cuda" and not self.interpreted:
            return "Triton needs a CUDA device (or TRITON_INTERPRET=1 at smoke sizes)"
        try:
            importlib.import_module("kdrl_kernels.triton.logprobs")
        except ImportError as err:
            return f"kdrl_kernels Triton kernels not importable: {err}"
        return None

    def loss(self, inp, case):
        from kdrl_kernels import fused_linear_kl, fused_linear_logprobs
        if case.workload == "rkl":
            kl = fused_linear_kl(inp.hidden, inp.weight, inp.t_hidden, inp.t_weight, kind="reverse",
                                 backend=self.backend)
            return naive.token_mean(kl.view_as(inp.mask), inp.mask)
        targets = inp.targets.reshape(-1)
        s = fused_linear_logprobs(inp.hidden, inp.weight, targets, backend=self.backend)
        t = None
        if case.workload == "kdrl":
            with torch.no_grad():
                t = fused_linear_logprobs(inp.t_hidden, inp.t_weight, targets, backend=self.backend)
        return _objective_from_logprobs(s, t, inp, case.workload)


class OursKDRLLoss(Provider):
    """``KDRLLoss``: on CPU a single pass that computes gradients during forward (6NdV, no recompute).

    Configured to do exactly the workload's work: ``compute_entropy=False`` (the entropy metric, on by default,
    costs an extra pass over each chunk that no other provider does). rkl is ``objective="kd"`` with the exact KL.
    """
    name, label = "ours-kdrlloss", "kdrl_kernels.KDRLLoss (single pass on CPU)"
    workloads = ("kdrl", "grpo", "rkl")
    flop_model = {"kdrl": "min", "grpo": "min", "rkl": "min"}
    OBJECTIVE = {"kdrl": dict(objective="kdrl", kl_estimator="k2"), "grpo": dict(objective="grpo"),
                 "rkl": dict(objective="kd", kl_estimator="exact")}

    def __init__(self, backend="auto", name=None):
        self.backend = backend
        if name:
            self.name = name
        self._fns = {}

    def flop_model_for(self, case):
        # KDRLLoss on Triton (the automatic choice on CUDA) composes the Triton ops, which recompute logits in
        # backward; the PyTorch backend's single pass does not, on any device.
        triton = self.backend == "triton" or (self.backend == "auto" and case.device == "cuda")
        return OursOps.FLOP_MODEL[case.workload] if triton else self.flop_model[case.workload]

    def unavailable(self, case):
        reason = super().unavailable(case)
        if reason:
            return reason
        try:
            from kdrl_kernels import KDRLConfig, KDRLLoss  # noqa: F401
        except ImportError:
            return "kdrl_kernels.KDRLLoss not available in this checkout"
        return None

    def _fn(self, inp, workload):
        from kdrl_kernels import KDRLConfig, KDRLLoss
        key = (workload, inp.beta, inp.eps_low, inp.eps_high)
        if key not in self._fns:
            self._fns[key] = KDRLLoss(KDRLConfig(beta=inp.beta, eps_low=inp.eps_low, eps_high=inp.eps_high,
                                                 aggregation="token_mean", compute_entropy=False,
                                                 backend=self.backend, **self.OBJECTIVE[workload]))
        return self._fns[key]

    def loss(self, inp, case):
        teacher, adv = {}, {}
        if case.workload != "grpo":
            teacher = dict(teacher_hidden=_seq(inp.t_hidden, case), teacher_weight=inp.t_weight)
        if case.workload != "rkl":
            adv = dict(advantages=inp.advantages)
        loss, _ = self._fn(inp, case.workload)(_seq(inp.hidden, case), inp.weight, inp.targets, inp.mask,
                                               **teacher, **adv)
        return loss


def _liger_missing():
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'kdrl-kernels[bench]')"
    return None


class LigerGRPO(Provider):
    """Liger-Kernel's chunked GRPO loss. Its KL-to-reference term (beta, ref_input/ref_weight) is the closest peer
    of KDRL's KL-to-teacher, with the teacher as the reference model; Liger uses the k3 estimator where KDRL uses
    k2 (same cost: both are elementwise on the two log-probs). loss_type="dapo" is the token mean."""
    name, label = "liger-grpo", "Liger LigerFusedLinearGRPOLoss (compiled, k3 to teacher as ref model)"
    workloads = ("kdrl", "grpo")
    flop_model = {"kdrl": "recompute", "grpo": "recompute"}

    def __init__(self, compiled=True):
        self.compiled = self.needs_warmup = compiled
        self._fns = {}

    def unavailable(self, case):
        return Provider.unavailable(self, case) or _liger_missing()

    def warmup_case(self, case):
        # Only the per-token loss math is compiled (the log-prob GEMMs run eagerly), and its tensors are shaped
        # (sequences per chunk, T) and (B, T): a tiny d and V compile the same graphs at a fraction of the cost.
        return dataclasses.replace(case, d=16, d_t=16, vocab=256)

    def loss(self, inp, case):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        kdrl = case.workload == "kdrl"
        key = (kdrl, inp.beta, inp.eps_low, inp.eps_high)
        if key not in self._fns:
            self._fns[key] = LigerFusedLinearGRPOLoss(
                beta=inp.beta if kdrl else 0.0, use_ref_model=kdrl, compiled=self.compiled,
                epsilon_low=inp.eps_low, epsilon_high=inp.eps_high, loss_type="dapo")
        ref = dict(ref_input=_seq(inp.t_hidden, case), ref_weight=inp.t_weight) if kdrl else {}
        loss, _metrics = self._fns[key](_seq(inp.hidden, case), inp.weight, inp.targets, inp.mask,
                                        inp.advantages, **ref)
        return loss


class LigerJSD(Provider):
    """Liger-Kernel's chunked JSD loss with beta=1, which its code evaluates as
    ``sum_v p_s (log p_s - log p_t)`` = reverse KL(student || teacher) exactly; weight_hard_loss=0 (no CE term),
    weight_soft_loss=1, sum over tokens divided by the number of non-ignored tokens (token mean)."""
    name, label = "liger-jsd", "Liger LigerFusedLinearJSDLoss (compiled, beta=1: reverse KL)"
    workloads = ("rkl",)
    flop_model = {"rkl": "min"}

    def __init__(self, compiled=True):
        self.compiled = self.needs_warmup = compiled
        self._fn = None

    def unavailable(self, case):
        return Provider.unavailable(self, case) or _liger_missing()

    def loss(self, inp, case):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        if self._fn is None:
            self._fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                               compiled=self.compiled)
        return self._fn(inp.hidden, inp.weight, inp.t_hidden, inp.t_weight, inp.targets.reshape(-1))


class TorchLCE(Provider):
    """``torch.nn.functional.linear_cross_entropy`` (chunked options) for the log-prob part:
    ``logp = -CE(reduction='none')``, teacher under no_grad, the objective on top in plain torch."""
    name, label = "torch-lce", "torch F.linear_cross_entropy (chunked) for log-probs"
    workloads = ("kdrl", "grpo")
    flop_model = {"kdrl": "min", "grpo": "min"}

    def unavailable(self, case):
        reason = super().unavailable(case)
        if reason:
            return reason
        if not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no F.linear_cross_entropy"
        return None

    @staticmethod
    def _logp(hidden, weight, targets):
        opts = torch.nn.LinearCrossEntropyOptions()
        return -F.linear_cross_entropy(hidden, weight, targets, reduction="none", options=opts).float()

    def loss(self, inp, case):
        targets = inp.targets.reshape(-1)
        s = self._logp(inp.hidden, inp.weight, targets).view_as(inp.mask)
        t = None
        if case.workload == "kdrl":
            with torch.no_grad():
                t = self._logp(inp.t_hidden, inp.t_weight, targets).view_as(inp.mask)
        adv = inp.advantages[:, None]
        ratio = torch.exp(s - s.detach())
        per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - inp.eps_low, 1 + inp.eps_high) * adv)
        if t is not None:
            per_token = per_token + inp.beta * 0.5 * (t - s) ** 2
        return naive.token_mean(per_token, inp.mask)


def all_providers(liger_compiled=True):
    """Every provider, in table order; callers filter with ``unavailable``."""
    return [Naive(), OursKDRLLoss(), OursOps("torch"), OursOps("triton"), LigerGRPO(liger_compiled),
            LigerJSD(liger_compiled), TorchLCE()]


def select(names, liger_compiled=True):
    """Providers by name (``None``: all); unknown names are an error listing the known ones."""
    provs = all_providers(liger_compiled)
    if not names:
        return provs
    known = {p.name: p for p in provs}
    known.update({"ours-triton": next(p for p in provs if isinstance(p, OursOps) and p.backend == "triton")})
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"unknown provider(s) {missing}; known: {sorted(known)}")
    return [known[n] for n in names]
