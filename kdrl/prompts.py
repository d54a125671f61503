"""Prompt construction shared by evaluation and training, so both see exactly the same text.

Styles:
- "boxed" (default, as Qwen2.5-Math's evaluation): system message asking to reason step by step and put the final
  answer in `\\boxed{}`, the problem as the user message, rendered with the model's chat template.
- "boxed_user": the same instruction appended to the user message (for templates without a system role).
- "fewshot": lm-eval style plain text, `Question: ...\\nAnswer: <worked solution>` examples, no chat template.
"""
from __future__ import annotations

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
STYLES = ("boxed", "boxed_user", "fewshot")

__all__ = ["BOXED_INSTRUCTION", "STYLES", "build_messages", "render_prompt", "fewshot_prefix"]


def build_messages(question: str, *, style: str = "boxed") -> list[dict]:
    """Chat messages for the tokenizer's chat template ("boxed" or "boxed_user" styles)."""
    if style == "boxed":
        return [{"role": "system", "content": BOXED_INSTRUCTION}, {"role": "user", "content": question}]
    if style == "boxed_user":
        return [{"role": "user", "content": f"{question}\n{BOXED_INSTRUCTION}"}]
    raise ValueError(f"build_messages: style must be 'boxed' or 'boxed_user' (chat styles), got {style!r}")


def fewshot_prefix(examples: list[tuple[str, str]]) -> str:
    """`Question: q\\nAnswer: a\\n\\n` for each (question, worked answer) example, in order."""
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in examples)


def render_prompt(tokenizer, question: str, *, style: str = "boxed",
                  examples: list[tuple[str, str]] | None = None) -> str:
    """The exact prompt string given to the generator.

    tokenizer: a transformers tokenizer with a chat template (chat styles only).
    examples: (question, worked answer) pairs for style "fewshot" (may be empty: zero-shot plain text).
    """
    if style == "fewshot":
        return fewshot_prefix(examples or []) + f"Question: {question}\nAnswer:"
    if style not in STYLES:
        raise ValueError(f"render_prompt: style must be one of {STYLES}, got {style!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("render_prompt: the tokenizer has no chat template; use style='fewshot'")
    return tokenizer.apply_chat_template(build_messages(question, style=style), tokenize=False,
                                         add_generation_prompt=True)
