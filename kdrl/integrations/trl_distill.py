"""TRL's ``DistillationTrainer`` with its divergence computed by ``kdrl_kernels.fused_linear_kl``.

TRL 1.16's ``DistillationTrainer`` trains the student on its own samples to match the teacher's next-token
distribution under a generalised Jensen-Shannon divergence selected by ``DistillationConfig.beta``:
``beta = 0`` is the forward KL(teacher || student), ``beta = 1`` the reverse KL(student || teacher), and anything
in between ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)`` with ``m = beta * teacher + (1 - beta) *
student`` (0.5: the ordinary JSD). Both distributions are taken at ``DistillationConfig.temperature`` (logits
divided by it, no ``T**2`` factor). The per-token values are summed over the completion tokens (times TRL's tool
mask) and divided by the generation batch's token count (``num_items_in_batch``, divided by the process count) in
training, or by the micro-batch's own count when there is none (evaluation).

:class:`KDRLDistillationTrainer` keeps everything else of TRL's (sampling, vLLM, tools, gradient accumulation,
DDP forward redirection, the entropy metric) and replaces only ``_compute_loss``: the student's and the teacher's
backbones run through TRL's own ``_get_last_hidden_state`` (no lm_head, hence no logits), and the divergence is
``fused_linear_kl`` on those hidden states and the two lm_head weights, tile by tile, skipping masked positions.
The student entropy TRL logs comes from ``fused_linear_logprobs`` (one extra no-grad pass over the student's head).

Settings this path does not implement are refused when the trainer is built, not ignored: see
``_check_supported``.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from trl import DistillationTrainer

from kdrl_kernels import fused_linear_kl, fused_linear_logprobs

from .trl_hooks import check_trl_hooks

__all__ = ["KDRLDistillationTrainer", "hidden_state_divergence", "divergence_kind", "HOOKS", "ATTRIBUTES"]

# TRL 1.16's DistillationTrainer methods this subclass overrides (_compute_loss) or calls, with the parameters it was
# written for, and the attributes it reads; checked at construction (kdrl/integrations/trl_hooks.py).
HOOKS = {
    "compute_loss": "(self, model, inputs, return_outputs=False, num_items_in_batch=None)",
    "_compute_loss": "(self, unwrapped_student, inputs, num_items_in_batch)",
    "_get_last_hidden_state": (
        "(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, pixel_values=None, image_grid_thw=None, "
        "pixel_attention_mask=None, spatial_shapes=None, image_sizes=None, token_type_ids=None, "
        "mm_token_type_ids=None, image_position_ids=None)"),
}
ATTRIBUTES = ("beta", "temperature", "teacher_model", "_is_vlm", "is_fsdp_enabled", "_forward_redirection")

# Config attributes with which a model changes its logits after the lm_head matmul (read by TRL 1.16's loss).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def divergence_kind(beta: float) -> str:
    """The ``fused_linear_kl`` kind that TRL's ``DistillationConfig.beta`` selects."""
    if beta == 0.0:
        return "forward"
    if beta == 1.0:
        return "reverse"
    if 0.0 < beta < 1.0:
        return "jsd"
    raise ValueError(f"beta must be in [0, 1], got {beta}")


def _head(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def hidden_state_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, *, beta,
                            temperature=1.0, num_items_in_batch=None, completion_ids=None, student_bias=None,
                            teacher_bias=None, backend="auto", chunk_size=None):
    """TRL's distillation loss from hidden states: ``(loss, student entropy summed over the loss tokens, their count)``.

    student_hidden ``(B, T, d)`` (or ``(N, d)``), teacher_hidden ``(B, T, d_t)``, the lm_head weights ``(V, d)`` and
    ``(V, d_t)``, mask ``(B, T)`` bool (the loss tokens). The per-token divergence TRL's ``beta`` selects
    (:func:`divergence_kind`) at ``temperature`` is summed over the mask and divided by ``num_items_in_batch``, or by
    the mask's count when that is None. The entropy is of the student's tempered distribution, no gradient;
    ``completion_ids`` (any ids in ``[0, V)`` where the mask is set) only feed the op computing it.
    """
    if isinstance(student_weight, DTensor) or isinstance(teacher_weight, DTensor):
        raise ValueError("KDRLDistillationTrainer needs unsharded lm_head weights (got a DTensor)")
    device = student_weight.device
    student_hidden, teacher_hidden, mask = student_hidden.to(device), teacher_hidden.to(device), mask.to(device)
    # Under autocast TRL computes both projections in the autocast dtype (fp32 softmax); so do we, explicitly.
    if torch.is_autocast_enabled(device.type):
        s_dtype = t_dtype = torch.get_autocast_dtype(device.type)
    else:
        s_dtype, t_dtype = student_hidden.dtype, teacher_hidden.dtype
    if completion_ids is None:
        completion_ids = torch.zeros(mask.shape, dtype=torch.long, device=device)
    with torch.autocast(device.type, enabled=False):
        s_h, s_w = student_hidden.to(s_dtype), student_weight.to(s_dtype)
        t_h, t_w = teacher_hidden.to(t_dtype), teacher_weight.to(t_dtype)
        per_token = fused_linear_kl(s_h, s_w, t_h, t_w, kind=divergence_kind(beta), beta=beta,
                                    temperature=temperature, mask=mask, backend=backend, student_bias=student_bias,
                                    teacher_bias=teacher_bias, chunk_size=chunk_size)
        with torch.no_grad():  # the entropy TRL logs (no gradient)
            targets = completion_ids.to(device).masked_fill(~mask, -100)
            _, entropy = fused_linear_logprobs(s_h.detach(), s_w.detach(), targets,
                                               bias=None if student_bias is None else student_bias.detach(),
                                               temperature=temperature, backend=backend, return_entropy=True,
                                               chunk_size=chunk_size)
    n_valid = mask.sum()
    if num_items_in_batch is None:
        loss = per_token.sum() / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(device)
        loss = per_token.sum() / num_items_in_batch
    return loss, entropy.sum().detach(), n_valid


class KDRLDistillationTrainer(DistillationTrainer):
    """``DistillationTrainer`` whose loss is ``kdrl_kernels.fused_linear_kl`` on both models' hidden states.

    Same arguments as TRL's ``DistillationTrainer``, plus ``kdrl_backend`` (``"auto"``: Triton on CUDA, the chunked
    PyTorch path elsewhere) and ``kdrl_chunk_size`` (rows per chunk on the PyTorch path; None: about 256 MB of
    buffers). A local ``teacher_model`` is required.
    """

    def __init__(self, *args, kdrl_backend: str = "auto", kdrl_chunk_size: int | None = None, **kwargs):
        check_trl_hooks(DistillationTrainer, HOOKS)
        super().__init__(*args, **kwargs)
        check_trl_hooks(DistillationTrainer, HOOKS, ATTRIBUTES, self)
        self.kdrl_backend = kdrl_backend
        self.kdrl_chunk_size = kdrl_chunk_size
        self.kdrl_kind = divergence_kind(self.beta)
        self._check_supported()

    def _check_supported(self):
        """Refuse what this loss does not compute exactly as TRL does, rather than train something else."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        refused = {
            "no local teacher_model (a served teacher)": self.teacher_model is None,
            "a vision-language processing class (multimodal inputs)": self._is_vlm,
            "FSDP (the lm_head weight is read outside the module's forward, so it must not be sharded)":
                self.is_fsdp_enabled,
            "DeepSpeed ZeRO-3 (the lm_head weight must not be partitioned)": is_deepspeed_zero3_enabled(),
        }
        bad = [name for name, on in refused.items() if on]
        models = [("student", self.accelerator.unwrap_model(self.model))]
        if self.teacher_model is not None:
            models.append(("teacher", self.accelerator.unwrap_model(self.teacher_model)))
        for who, model in models:
            text_config = model.config.get_text_config()
            scaled = [name for name in _LOGIT_TRANSFORMS if getattr(text_config, name, None) not in (None, 1.0)]
            if scaled:
                bad.append(f"a {who} whose logits are transformed after the lm_head ({', '.join(scaled)}); "
                           "fused_linear_kl scores (hidden @ weight.T + bias) / temperature only")
        if bad:
            raise ValueError(f"KDRLDistillationTrainer does not implement {'; '.join(bad)}")

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """TRL's loss hook: ``(loss, student entropy summed over the loss tokens, number of loss tokens)``."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:  # tool responses inside a completion are not trained on
            mask = mask & inputs["tool_mask"].bool()
        width = inputs["completion_ids"].shape[1]

        # (B, width, d): the hidden states predicting each completion token; TRL's backbone-only forward.
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, width)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, width)
        s_weight, s_bias = _head(unwrapped_student)
        t_weight, t_bias = _head(unwrapped_teacher)
        return hidden_state_divergence(student_hidden, s_weight, teacher_hidden, t_weight, mask, beta=self.beta,
                                       temperature=self.temperature, num_items_in_batch=num_items_in_batch,
                                       completion_ids=inputs["completion_ids"], student_bias=s_bias,
                                       teacher_bias=t_bias, backend=self.kdrl_backend,
                                       chunk_size=self.kdrl_chunk_size)
