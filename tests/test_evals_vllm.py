"""vLLM backend (slow; needs vllm importable: `bash scripts/setup_eval.sh`): same contract as the hf backend.

    python -m pytest --run-slow tests/test_evals_vllm.py      # DIR/bin/python after `setup_eval.sh --venv DIR`
"""
import pytest
import torch

from kdrl.data import load_task
from kdrl.generation import SamplingConfig, make_generator, vllm_available
from kdrl.prompts import render_prompt

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]


def test_vllm_matches_hf_contract():
    vl = make_generator("smollm2-135m-instruct", backend="vllm")
    hf = make_generator("smollm2-135m-instruct", backend="hf", batch_size=4)
    prompts = [render_prompt(hf.tokenizer, p.question) for p in load_task("gsm8k", limit=3)]
    greedy = SamplingConfig(max_new_tokens=24)
    a, b = vl.generate(prompts, greedy, progress=False), hf.generate(prompts, greedy, progress=False)
    # Exact token equality is too strict: near-ties (a top-2 logit gap of 0.004 was seen at step 2) flip with
    # padding and bf16 kernels. Instead every vLLM token must be (near-)argmax of the hf model in float32 given
    # the same prompt ids, which also fails if the backends saw different inputs (e.g. an extra BOS).
    model32 = hf.model.float()
    for p, (ca,), (cb,) in zip(prompts, a, b):
        ids = hf.tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        path = torch.tensor([ca.token_ids])
        with torch.no_grad():
            logits = model32(torch.cat([ids, path], 1)).logits[0, ids.shape[1] - 1:-1]
        regret = logits.max(-1).values - logits.gather(1, path.T).squeeze(1)
        assert float(regret.max()) < 0.5, regret
        assert ca.finish_reason == ("length" if len(ca.token_ids) == 24 else "stop")
        assert cb.finish_reason == ("length" if len(cb.token_ids) == 24 else "stop")
    hf.model.to(torch.bfloat16)
    sampled = vl.generate(prompts[:1], SamplingConfig(max_new_tokens=8, temperature=1.0, n=3), progress=False)
    assert len(sampled) == 1 and len(sampled[0]) == 3
    # Weight sync: reloading the model's own weights leaves greedy output unchanged.
    vl.update_weights(hf.model.state_dict())
    assert [c[0].token_ids for c in vl.generate(prompts, greedy, progress=False)] == [c[0].token_ids for c in a]
