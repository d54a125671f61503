"""Tiny offline models for the trainer tests: a random 2-layer Llama with a byte-level ChatML tokenizer.

No download: the tokenizer has the 256 byte symbols plus three special tokens and no merges, which is enough for
chat templates, generation and decoding. The teacher is the student with every weight perturbed, so the two
disagree by a small, known amount.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:2])
    fast.chat_template = CHATML
    return fast


def tiny_config(vocab_size: int, hidden: int = 64, heads: int = 4):
    """``hidden=128, heads=2`` gives head_dim 64, the smallest vLLM's CPU attention accepts."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=1024,
                       tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, bos_token_id=None,
                       initializer_range=0.2)  # peaked, not near-uniform, next-token distributions


def make_tiny_pair(root: Path, seed: int = 0, noise: float = 0.5, **shape) -> tuple[Path, Path]:
    """Write ``root/student`` and ``root/teacher`` model directories; returns their paths. ``shape``: of
    :func:`tiny_config`."""
    from transformers import LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    student = LlamaForCausalLM(tiny_config(len(tok), **shape))
    paths = []
    for name in ("student", "teacher"):
        model = student
        if name == "teacher":
            model = LlamaForCausalLM(tiny_config(len(tok), **shape))
            model.load_state_dict(student.state_dict())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(noise * p.std().clamp_min(1e-3) * torch.randn_like(p))
        path = Path(root) / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture
def one_thread():
    """Run a test with one torch thread, restoring the setting after: on a shared 2-core machine two spinning
    OpenMP threads are 10-30x slower than one for these tiny shapes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
