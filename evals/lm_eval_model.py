"""Our generators as an lm-eval model ("kdrl"), for lm-eval's generate_until tasks (our kdrl_* YAMLs or its own).

    python evals/lm_eval_model.py --tasks kdrl_gsm8k --limit 20 [--model qwen2.5-coder-0.5b-instruct]

runs lm-eval with `--include_path evals/lm_eval_tasks` on a registry model (resolved and converted by
kdrl.models) through our hf or vLLM backend. Log-likelihood tasks are not supported (raise).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # see evals/run.py: evals/ must not shadow top-level modules
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from kdrl.generation import SamplingConfig, make_generator  # noqa: E402
from kdrl.models import DEFAULT_MODEL  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


@register_model("kdrl")
class KdrlLM(LM):
    """generate_until through a kdrl generator. `generator` (any object with `.generate` and `.tokenizer`) may be
    given directly; otherwise one is built from model/backend/dtype."""

    def __init__(self, model: str = DEFAULT_MODEL, backend: str = "auto", dtype: str = "bfloat16",
                 max_gen_toks: int = 256, generator=None, **kw):
        super().__init__()
        self.generator = generator or make_generator(model, backend=backend, dtype=dtype)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.generator, "model_path", "kdrl"))

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.generator.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                            add_generation_prompt=add_generation_prompt)

    def _sampling(self, gen_kwargs: dict) -> SamplingConfig:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0
        return SamplingConfig(max_new_tokens=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                              temperature=temperature, top_p=float(gen_kwargs.get("top_p", 1.0)), stop=tuple(until))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Requests with the same generation settings go to the generator together (it batches them).
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for key, idx in groups.items():
            sampling = self._sampling(json.loads(key))
            completions = self.generator.generate([requests[i].args[0] for i in idx], sampling,
                                                  progress=not disable_tqdm)
            for i, comps in zip(idx, completions):
                out[i] = comps[0].text
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the kdrl lm-eval model supports generate_until tasks only")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the kdrl lm-eval model supports generate_until tasks only")


def run_lm_eval(lm: LM, tasks: list[str], *, limit: int | None = None, include_defaults: bool = False, **kw) -> dict:
    """lm_eval.simple_evaluate on our task YAMLs (data paths are relative to the repository root);
    include_defaults=True also indexes lm-eval's own tasks (slow: thousands of YAMLs)."""
    import os

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=True,
                               task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults), **kw)
    finally:
        os.chdir(cwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="kdrl_gsm8k", help="comma list of lm-eval task names (kdrl_* are ours)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--backend", default="auto", choices=("auto", "vllm", "hf"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-gen-toks", type=int, default=256)
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--include-defaults", action="store_true", help="also make lm-eval's own tasks available")
    args = p.parse_args()
    lm = KdrlLM(model=args.model, backend=args.backend, max_gen_toks=args.max_gen_toks)
    res = run_lm_eval(lm, args.tasks.split(","), limit=args.limit, include_defaults=args.include_defaults,
                      apply_chat_template=args.apply_chat_template)
    print(json.dumps(res["results"], indent=2, default=str))


if __name__ == "__main__":
    main()
