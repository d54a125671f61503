"""The trainer's update on a fixed batch with a tiny random Llama: alignment of hidden states with the sampled
tokens, the KD and GRPO terms moving the student the right way, micro-batching and fp32 master weights."""
import pytest
import torch

from _train_tiny import make_tiny_pair, one_thread  # noqa: F401
from kdrl.trainer.rollout import build_batch
from kdrl.trainer.step import MasterWeights, backward_microbatches, hidden_states
from kdrl_kernels import KDRLConfig, KDRLLoss, fused_linear_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

G = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))


def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def fixed_batch(seed=0):
    """Two prompts of different lengths, G responses each of lengths 3..12, rewards with both signs per group."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (7, 4)]
    responses = [[torch.randint(3, 259, (int(n),), generator=g).tolist() + [2]
                  for n in torch.randint(2, 12, (G,), generator=g)] for _ in prompts]
    correct = [[True, False, False, True], [False, False, False, True]]
    return build_batch(prompts, responses, correct, [[False] * G] * 2, pad_id=0)


def seq_logprobs(model, batch):
    """``(B, T)`` student log-probs of the sampled tokens (0 off the mask), no gradient."""
    with torch.no_grad():
        targets = batch.targets.masked_fill(~batch.mask, -100)
        return fused_linear_logprobs(hidden_states(model, batch), model.get_output_embeddings().weight, targets)


def test_hidden_states_align_with_targets(pair):
    """Column t of hidden_states predicts response token t, unaffected by the left padding of shorter prompts."""
    model, batch = load(pair[0]), fixed_batch()
    ours = seq_logprobs(model, batch)
    p = batch.prompt_width
    for i in (0, 5):  # a row of the long prompt and one of the short (left-padded) prompt
        ids = batch.input_ids[i][batch.attention_mask[i].bool()]
        with torch.no_grad():
            logits = model(ids[None]).logits[0].float()
        n_prompt = int(batch.attention_mask[i, :p].sum())
        n_resp = int(batch.mask[i].sum())
        want = logits.log_softmax(-1)[n_prompt - 1:n_prompt - 1 + n_resp].gather(
            1, ids[n_prompt:, None]).squeeze(1)
        torch.testing.assert_close(ours[i, :n_resp], want, atol=2e-5, rtol=1e-5)
        assert ours[i, n_resp:].abs().sum() == 0


def train_steps(model, batch, loss_fn, n, teacher=None, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    t_hidden = None
    if teacher is not None:
        with torch.no_grad():
            t_hidden = hidden_states(teacher, batch)
    losses = []
    for step in range(n):
        metrics = backward_microbatches(model, loss_fn, batch, micro_batch_size=3, teacher_hidden=t_hidden,
                                        teacher_weight=None if teacher is None else teacher.lm_head.weight,
                                        step=step)
        opt.step()
        opt.zero_grad()
        losses.append(metrics)
    return losses


def test_kd_loss_decreases_and_moves_student_to_teacher(pair):
    student, teacher, batch = load(pair[0]), load(pair[1]), fixed_batch()
    t_logp = seq_logprobs(teacher, batch)
    gap_before = ((seq_logprobs(student, batch) - t_logp).abs() * batch.mask).sum()
    loss_fn = KDRLLoss(KDRLConfig(objective="kd", kl_estimator="k2", log_exact_kl=True))
    history = train_steps(student, batch, loss_fn, 5, teacher=teacher, lr=1e-3)
    losses = [m["loss"] for m in history]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.2 * losses[0], losses
    # k2 on the sampled tokens is what is optimised; the full-vocabulary reverse KL follows, more slowly.
    assert history[-1]["exact_kl"] < history[0]["exact_kl"]
    gap_after = ((seq_logprobs(student, batch) - t_logp).abs() * batch.mask).sum()
    assert gap_after < 0.5 * gap_before


def test_grpo_raises_logprobs_of_positive_advantage_responses(pair):
    student, batch = load(pair[0]), fixed_batch()
    before = seq_logprobs(student, batch).sum(-1)
    train_steps(student, batch, KDRLLoss(KDRLConfig(objective="grpo")), 3, lr=3e-3)
    change = seq_logprobs(student, batch).sum(-1) - before
    assert (change[batch.advantages > 0] > 0).all(), change
    assert (change[batch.advantages < 0] < 0).all(), change


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "dr_grpo"])
def test_micro_batches_give_the_whole_batch_gradient(pair, aggregation):
    student, teacher, batch = load(pair[0]), load(pair[1]), fixed_batch(seed=1)
    with torch.no_grad():
        t_hidden = hidden_states(teacher, batch)
    loss_fn = KDRLLoss(KDRLConfig(objective="kdrl", beta=0.5, aggregation=aggregation))
    grads = []
    for mb in (len(batch), 3):
        student.zero_grad()
        backward_microbatches(student, loss_fn, batch, micro_batch_size=mb, teacher_hidden=t_hidden,
                              teacher_weight=teacher.lm_head.weight, step=0)
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def test_master_weights_accumulate_in_fp32_and_publish_bf16(pair):
    model = load(pair[0], torch.bfloat16)
    params = dict(model.named_parameters())
    master = MasterWeights(params, enabled=True)
    assert all(p.dtype == torch.float32 for p in master.params.values())
    loss_fn = KDRLLoss(KDRLConfig(objective="grpo"))
    backward_microbatches(model, loss_fn, fixed_batch(), micro_batch_size=3, after_backward=master.accumulate)
    assert all(p.grad is None for p in params.values())  # moved into the masters
    opt = torch.optim.AdamW(list(master.params.values()), lr=1e-3)
    before = {n: p.detach().clone() for n, p in master.params.items()}
    opt.step()
    master.publish()
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(before[name], master.params[name])
    assert torch.equal(params[name], master.params[name].to(torch.bfloat16))


def test_teacher_logprobs_and_teacher_hidden_give_the_same_update(pair):
    """The trainer passes precomputed teacher log-probs unless the exact KL is wanted: same loss, same gradient."""
    student, teacher, batch = load(pair[0]), load(pair[1]), fixed_batch(seed=2)
    with torch.no_grad():
        t_hidden = hidden_states(teacher, batch)
    loss_fn = KDRLLoss(KDRLConfig(objective="kdrl", beta=0.5))
    runs = []
    for teacher_inputs in ({"teacher_hidden": t_hidden, "teacher_weight": teacher.lm_head.weight},
                           {"teacher_logprobs": seq_logprobs(teacher, batch)}):
        student.zero_grad()
        m = backward_microbatches(student, loss_fn, batch, micro_batch_size=3, step=0, **teacher_inputs)
        runs.append((m["loss"], torch.cat([p.grad.flatten() for p in student.parameters()])))
    assert abs(runs[0][0] - runs[1][0]) < 1e-6
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-6, rtol=1e-4)
