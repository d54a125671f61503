"""Shared pieces of the KDRLGRPOTrainer tests: the tiny models, the two trainers (ours and TRL's own) and a prepared
GRPO micro-batch that engages both clip bounds. Tiny random Llama (vocabulary 259), CPU."""
import copy

import torch

from _train_tiny import make_tiny_pair

B, P, T = 4, 6, 8  # sequences, prompt width (left-padded), completion width (= max_completion_length)
# fp32 on CPU: TRL's chunked head and ours differ only in summation order (and RoPE positions shifted by the
# left padding, which RoPE's relative form cancels up to rounding).
TOL = dict(rtol=2e-5, atol=2e-6)


def make_tiny(tmp_path_factory):
    """What the ``tiny`` fixture of each test module holds: the student and teacher directories, the tokenizer and
    an 8-prompt dataset."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    student_dir, teacher_dir = make_tiny_pair(tmp_path_factory.mktemp("models"))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
                              for i in range(8)])
    return student_dir, teacher_dir, AutoTokenizer.from_pretrained(student_dir), data


def _reward(completions, **kwargs):
    return [float(i % 2) for i in range(len(completions))]


def _load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _args(tmp_path, **overrides):
    from trl import GRPOConfig
    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=B, num_generations=4,
              gradient_accumulation_steps=2, max_completion_length=T, max_steps=1, learning_rate=1e-2, use_cpu=True,
              report_to=[], logging_steps=1, save_strategy="no", bf16=False, seed=0)
    kw.update(overrides)
    return GRPOConfig(**kw)


def _ours(tiny, tmp_path, model=None, teacher=False, kdrl=None, trl_clip_metrics=True, **overrides):
    from kdrl.integrations.trl_grpo import KDRLGRPOTrainer
    from kdrl_kernels import KDRLConfig
    student_dir, teacher_dir, tok, data = tiny
    return KDRLGRPOTrainer(model=model if model is not None else _load(student_dir), reward_funcs=_reward,
                           args=_args(tmp_path / "ours", **overrides), train_dataset=data, processing_class=tok,
                           teacher_model=_load(teacher_dir) if teacher else None,
                           kdrl_config=kdrl or KDRLConfig(objective="grpo"), trl_clip_metrics=trl_clip_metrics)


def _theirs(tiny, tmp_path, model, **overrides):
    from trl import GRPOTrainer
    _, _, tok, data = tiny
    return GRPOTrainer(model=model, reward_funcs=_reward, args=_args(tmp_path / "trl", **overrides),
                       train_dataset=data, processing_class=tok)


def _batch(trainer, is_mode=None, seed=0):
    """A prepared GRPO micro-batch: left-padded prompts, right-padded completions (one full, one empty), mixed-sign
    advantages, old log-probs off-policy enough that both clip bounds engage, a generation-batch token count spanning
    more than this micro-batch, and optionally TRL's vLLM importance-sampling ratio."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_len, comp_len = torch.tensor([6, 3, 5, 2]), torch.tensor([8, 5, 2, 0])
    prompt_mask = (torch.arange(P)[None] >= P - prompt_len[:, None]).long()
    completion_mask = (torch.arange(T)[None] < comp_len[:, None]).long()
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g) * prompt_mask
    completion_ids = torch.randint(3, vocab, (B, T), generator=g) * completion_mask
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.tensor([1.0, -0.7, 0.5, -1.2]),
                  num_items_in_batch=3.0 * completion_mask.sum().float())
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T)
    inputs["old_per_token_logps"] = (logp + (torch.rand(B, T, generator=g) - 0.5) * completion_mask).detach()
    if is_mode == "token":
        inputs["importance_sampling_ratio"] = torch.rand(B, T, generator=g) * 2 * (torch.rand(B, T, generator=g) > 0.2)
    elif is_mode == "sequence":
        inputs["importance_sampling_ratio"] = torch.tensor([[1.3], [0.0], [0.6], [2.0]])
    return inputs


def _loss_and_grads(trainer, inputs, accumulation=2):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = accumulation
    if "importance_sampling_ratio" in inputs:  # what use_vllm=True sets up, without a vLLM server
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    loss = trainer.compute_loss(trainer.model, copy.copy(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                           if p.grad is not None}


def _assert_same(ours, theirs):
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs
    torch.testing.assert_close(loss_a, loss_b, **TOL)
    assert grads_a.keys() == grads_b.keys() and "lm_head.weight" in grads_a
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], **TOL, msg=lambda m: f"{name}: {m}")
