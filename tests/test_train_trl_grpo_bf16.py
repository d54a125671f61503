"""KDRLGRPOTrainer in bf16 against TRL's own GRPOTrainer, both measured against float64 (the project's rule,
tests/tolerance.py: ``|ours - gt| <= |trl - gt| + tol``).

Two set-ups, each with bf16 weights and with fp32 weights under bf16 autocast (what ``GRPOConfig(bf16=True)``
does: accelerate wraps the model's forward in autocast; the loss outside the forward is not autocast):
- the part the subclass replaces (hidden states -> lm_head -> log-probs -> loss), on the *same* hidden states for
  both trainers: the model's backbone is swapped for a fixed hidden-state tensor (a parameter, so its gradient is
  checked too). Here the elementwise rule holds for the loss and every gradient entry;
- the whole model. There both sides' gradients are off float64 by 2-4% of their norm, set by the bf16 backbone (both
  run it; ours with position ids that count attended tokens, TRL's without, so their rounding differs), so the rule
  is checked on the loss with a bf16-sized ``tol`` and on each gradient's norm-wise error (not elementwise).
Tiny random Llama, CPU.
"""
import copy

import pytest
import torch

pytest.importorskip("trl")
from _train_tiny import one_thread  # noqa: E402,F401
from _trl_grpo import _batch, _load, _loss_and_grads, _ours, _theirs, make_tiny  # noqa: E402
from tolerance import assert_close_to_gt, bf16_grad_tol  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory)


class FixedBackbone(torch.nn.Module):
    """Stands in for a causal LM's backbone: returns the same final hidden states ``(B, L, d)`` for any input, so
    both trainers' heads see identical inputs. A parameter, so ``dL/dH`` is checked like any weight gradient."""

    def __init__(self, hidden, embed_tokens):
        super().__init__()
        self.hidden = torch.nn.Parameter(hidden)
        self.embed_tokens = embed_tokens.requires_grad_(False)  # unused; transformers finds the lm_head through it

    def forward(self, input_ids=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast
        return BaseModelOutputWithPast(last_hidden_state=self.hidden, hidden_states=(self.hidden,))


def _trainers(tiny, tmp_path, model, mode, loss_type, fixed_hidden):
    """(ours, TRL's, TRL's in float64, a batch) on copies of ``model`` (fp32). ``mode``: "weights" (bf16 weights)
    or "autocast" (fp32 weights, GRPOConfig(bf16=True), the model prepared by accelerate as train() does)."""
    from kdrl_kernels import KDRLConfig

    if fixed_hidden:
        ids = torch.randint(3, model.config.vocab_size, (4, 14), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():  # realistic hidden states: the real backbone's, then frozen
            hidden = model.model(input_ids=ids).last_hidden_state
        model.model = FixedBackbone(hidden, model.model.embed_tokens)
    low = model.to(torch.bfloat16) if mode == "weights" else model
    kw = dict(loss_type=loss_type, temperature=TEMPERATURE, bf16=mode == "autocast")
    ours = _ours(tiny, tmp_path, model=copy.deepcopy(low), kdrl=KDRLConfig(objective="grpo", temperature=TEMPERATURE),
                 **kw)
    theirs = _theirs(tiny, tmp_path, copy.deepcopy(low), **kw)
    for trainer in (ours, theirs):
        trainer.model = trainer.accelerator.prepare_model(trainer.model)
    gt = _theirs(tiny, tmp_path, copy.deepcopy(low).double(), loss_type=loss_type, temperature=TEMPERATURE)
    return ours, theirs, gt, _batch(_theirs(tiny, tmp_path, copy.deepcopy(model).float(), temperature=TEMPERATURE))


@pytest.mark.parametrize("mode", ["weights", "autocast"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_head_and_loss_closer_to_float64_than_trls(tiny, tmp_path, mode, loss_type):
    """Same hidden states: loss, dL/dW (lm_head) and dL/dH elementwise no farther from float64 than TRL's + tol."""
    ours, theirs, gt, inputs = _trainers(tiny, tmp_path, _load(tiny[0]), mode, loss_type, fixed_hidden=True)
    (lo, go), (lt, gtr), (lg, gg) = (_loss_and_grads(t, inputs) for t in (ours, theirs, gt))
    assert set(go) == set(gg) == {"model.hidden", "lm_head.weight"}
    assert_close_to_gt(lo, lg, lt, tol=2 ** -16 * float(lg.abs()), name="loss")
    for name in gg:
        assert_close_to_gt(go[name], gg[name], gtr[name], tol=bf16_grad_tol(gg[name]), name=name)


@pytest.mark.parametrize("mode", ["weights", "autocast"])
def test_whole_model_as_close_to_float64_as_trls(tiny, tmp_path, mode):
    """The whole bf16 model (dapo, TRL's default). Measured on this CPU (loss_type dapo / grpo / bnpo): the loss is
    off float64 by 3e-4..1.3e-3 for ours against 8e-5..7.6e-4 for TRL's (|loss| 0.09..0.19), gradients by 2.4-3.6%
    of their norm on both sides (ours / TRL's per tensor 0.57..1.22). The head alone is closer to float64 than TRL's
    (test above); the rest is the backbone's bf16 rounding, which differs with the position ids (ours count attended
    tokens, as generation does; without them our loss error under autocast falls to 5e-5..8e-5, TRL's 3.5e-4..5.3e-4).
    So: the loss within TRL's error + one bf16 ulp of the loss (2**-7 |gt|), each gradient's norm-wise error within
    1.5x TRL's."""
    ours, theirs, gt, inputs = _trainers(tiny, tmp_path, _load(tiny[0]), mode, "dapo", fixed_hidden=False)
    (lo, go), (lt, gtr), (lg, gg) = (_loss_and_grads(t, inputs) for t in (ours, theirs, gt))
    assert_close_to_gt(lo, lg, lt, tol=2 ** -7 * float(lg.abs()), name="loss")
    assert set(go) == set(gg) and len(gg) > 10
    for name in gg:
        err_ours, err_trl = ((g[name].double() - gg[name]).norm() for g in (go, gtr))
        assert err_ours <= 1.5 * err_trl, (name, float(err_ours), float(err_trl))
