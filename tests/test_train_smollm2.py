"""A few updates of the real SmolLM2-135M-Instruct (98 MB registry download, cached) on a fixed GSM8K batch, with
a perturbed copy as the teacher: the KDRL loss falls and the KD term pulls the student's log-probs to the teacher's.
"""
import pytest
import torch

from _train_tiny import one_thread  # noqa: F401
from kdrl.trainer.rollout import build_batch
from kdrl.trainer.step import MasterWeights, backward_microbatches, hidden_states
from kdrl_kernels import KDRLConfig, KDRLLoss, fused_linear_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smollm2():
    from kdrl.models import load_model_and_tokenizer
    return load_model_and_tokenizer("smollm2-135m-instruct", progress=False)


def gsm8k_batch(tokenizer, n_prompts=2, group=4):
    """Prompts from GSM8K train; the "responses" are slices of the reference solutions (fixed, not sampled)."""
    from kdrl.data import load_task
    from kdrl.prompts import build_messages
    problems = load_task("gsm8k_train", limit=n_prompts)
    prompts = [tokenizer(tokenizer.apply_chat_template(build_messages(p.question), tokenize=False,
                                                       add_generation_prompt=True), add_special_tokens=False)
               ["input_ids"] for p in problems]
    solutions = [tokenizer(p.meta.get("solution", p.answer) if isinstance(p.meta, dict) else p.answer,
                           add_special_tokens=False)["input_ids"] for p in problems]
    responses = [[sol[: 12 + 6 * j] or [tokenizer.eos_token_id] for j in range(group)] for sol in solutions]
    correct = [[j % 2 == 0 for j in range(group)] for _ in problems]
    return build_batch(prompts, responses, correct, [[False] * group] * n_prompts, pad_id=tokenizer.pad_token_id)


def logprobs(model, batch):
    with torch.no_grad():
        return fused_linear_logprobs(hidden_states(model, batch), model.get_output_embeddings().weight,
                                     batch.targets.masked_fill(~batch.mask, -100))


def test_kdrl_steps_on_smollm2_lower_the_loss_and_approach_the_teacher(smollm2):
    student, tokenizer = smollm2
    teacher = type(student)(student.config).to(torch.bfloat16)
    teacher.load_state_dict(student.state_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * p.float().std() * torch.randn_like(p))
    teacher.requires_grad_(False)
    batch = gsm8k_batch(tokenizer)
    t_hidden = hidden_states(teacher, batch).detach()
    gap = lambda: ((logprobs(student, batch) - logprobs(teacher, batch)).abs() * batch.mask).sum()  # noqa: E731
    gap_before = gap()
    master = MasterWeights(dict(student.named_parameters()), enabled=True)
    opt = torch.optim.AdamW(list(master.params.values()), lr=1e-5)  # 1e-4 overshoots within 3 steps
    loss_fn = KDRLLoss(KDRLConfig(objective="kdrl", beta=1.0))
    history = []
    for step in range(3):
        history.append(backward_microbatches(student, loss_fn, batch, micro_batch_size=4, teacher_hidden=t_hidden,
                                             teacher_weight=teacher.get_output_embeddings().weight, step=step,
                                             after_backward=master.accumulate))
        opt.step()
        opt.zero_grad()
        master.publish()
    losses = [m["loss"] for m in history]
    assert losses[-1] < losses[0], losses
    assert history[-1]["k2"] < history[0]["k2"]
    assert gap() < gap_before
