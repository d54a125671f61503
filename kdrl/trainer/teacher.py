"""A teacher served by vLLM: log-probs of the sampled tokens from ``prompt_logprobs``, no teacher copy in torch.

``model.teacher_backend=vllm`` replaces the teacher's torch forward (hidden states -> fused log-probs, in this
process) with one scoring request per response to a vLLM engine holding the teacher:
``SamplingParams(max_tokens=1, prompt_logprobs=0)`` on the token ids ``prompt + response`` returns, for every
position, the teacher's log-prob of the token that is there. That is all the sampled-token estimators
(k1 / k2 / k3), KDRL shaping and TRRD need. It is not enough for the exact KL, which needs the teacher's whole
distribution at every position: :func:`kdrl.trainer.config.validate` refuses that combination before anything loads.

vLLM scores prompt tokens from the raw logits (temperature 1): prompt tokens skip its sampling processors, and one
log-prob per position cannot be re-tempered without the log-normaliser of ``logits / T``. So the served teacher
requires ``rollout.temperature=1`` (the loss temperature; see ``kdrl.trainer.config.loss_config``), also checked at start.
"""
from __future__ import annotations

import torch

from kdrl.trainer.rollout import RolloutBatch

__all__ = ["VLLMTeacher", "response_logprobs", "serve_teacher"]


def response_logprobs(prompt_logprobs: list, targets: list[int], start: int) -> list[float]:
    """The log-probs of ``targets`` read from vLLM's ``prompt_logprobs`` of one request.

    ``prompt_logprobs[i]`` maps token ids to ``Logprob`` objects for position ``i`` of the scored ids (``None`` at
    position 0); the response token ``t`` sits at position ``start + t``. With ``prompt_logprobs=0`` vLLM returns
    the log-prob of the token actually there (and no top-k).
    """
    out = []
    for t, token in enumerate(targets):
        entry = prompt_logprobs[start + t]
        if entry is None or token not in entry:
            raise RuntimeError(f"vLLM returned no prompt log-prob for token {token} at position {start + t}")
        out.append(float(entry[token].logprob))
    return out


class VLLMTeacher:
    """The teacher in a vLLM engine (CPU or GPU) that scores the rollouts' tokens.

    ``model_path``: registry name, local directory or hub id; ``dtype``: the engine's weight dtype. Extra keywords
    go to ``vllm.LLM``. The engine's processes end with this process (``kdrl.proc.start_watchdog``).
    """

    def __init__(self, model_path, *, dtype: str = "bfloat16", seed: int = 0, progress: bool = True, **llm_kw):
        from kdrl.generation import start_engine
        self.model_path, self.llm = start_engine(model_path, dtype=dtype, seed=seed, progress=progress, **llm_kw)
        self.tokenizer = self.llm.get_tokenizer()

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """``(B, T)`` float32 teacher log-probs of ``batch.targets`` at temperature 1; 0 where ``mask`` is False."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        P = batch.prompt_width
        requests, spans = [], []
        for row in range(len(batch)):
            keep = batch.attention_mask[row, :P].bool()
            prompt = batch.input_ids[row, :P][keep].tolist()
            n = int(batch.mask[row].sum())
            response = batch.targets[row, :n].tolist()
            if not response:  # an empty response: nothing to score (vLLM needs no request for it)
                spans.append(None)
                continue
            requests.append(TokensPrompt(prompt_token_ids=prompt + response))
            spans.append((len(requests) - 1, len(prompt), response))
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        out = torch.zeros(batch.targets.shape, dtype=torch.float32)
        for row, span in enumerate(spans):
            if span is None:
                continue
            i, start, response = span
            out[row, :len(response)] = torch.tensor(response_logprobs(outs[i].prompt_logprobs, response, start))
        return out

    def info(self) -> dict:
        import vllm
        return {"backend": "vllm", "vllm": vllm.__version__, "model": str(self.model_path)}


def serve_teacher(cfg, student_tokenizer, say=print) -> VLLMTeacher:
    """Start the vLLM teacher of a training config (``model.teacher``, ``model.dtype``, ``run.seed``)."""
    import time
    say(f"starting a vLLM engine for the teacher {cfg.model.teacher} (model.teacher_backend=vllm) ...")
    t0 = time.perf_counter()
    teacher = VLLMTeacher(cfg.model.teacher, dtype=cfg.model.dtype, seed=cfg.run.seed)
    if teacher.tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError("model.teacher must share the student's tokenizer (the KD terms compare log-probs of the "
                         "same token ids)")
    say(f"teacher engine ready ({time.perf_counter() - t0:.1f}s): it scores each rollout with prompt_logprobs")
    return teacher
