"""Answer extraction and grading for math problems.

`extract_answer` pulls the final answer out of a model response (last brace-matched `\\boxed{}` / `\\fbox{}`,
then "the answer is ...", then the last number). `grade` / `grade_many` compare it with a gold answer: a cheap
exact / numeric check first, then Math-Verify (sympy) in a separate worker process with our own per-pair timeout,
so that a pathological answer (say a huge power tower) can neither hang the run nor exhaust memory.

Safety: model output is never passed to eval/exec. Math-Verify is given only its LaTeX extractor; its plain
"expression" extractor goes through `sympy.parse_expr`, which evaluates Python, so it is not used.
Math-Verify's own timeouts use signals (main thread only); they are disabled and the worker is killed instead.
"""
from __future__ import annotations

import re

from kdrl.verify_pool import VerifierPool, shared_pool

__all__ = ["extract_answer", "extract_boxed", "grade", "grade_many", "normalize_answer", "quick_match", "sci_to_latex"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(r"the (?:final )?answer is[:\s]*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{', or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces matched); `\\boxed 5` also accepted."""
    for m in reversed(list(_BOXED.finditer(text))):
        end = m.end()
        if end < len(text) and text[end] == "{":
            inner = _braced(text, end)
            if inner is not None:
                return inner.strip()
        elif m.group(0).endswith(" "):  # "\boxed 5": the next token is the answer
            token = re.match(r"[^\s$.,]+", text[end:])
            if token:
                return token.group(0)
    return None


def extract_answer(text: str) -> str | None:
    """Final answer of a model response, or None.

    Order (as Qwen2.5-Math's evaluation): last `\\boxed{}`/`\\fbox{}`; else the text after the last
    "the answer is" up to the end of its sentence; else the last number in the text.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer: text must be str, got {type(text).__name__}")
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    hits = list(_ANSWER_IS.finditer(text))
    if hits:
        tail = text[hits[-1].end():]
        # The sentence ends at a newline or a full stop followed by a space/end (not a decimal point).
        sentence = re.split(r"\n|\.(?=\s|$)", tail, maxsplit=1)[0].strip().strip("$").strip()
        if sentence:
            return sentence
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].rstrip(".")
    return None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(ans: str) -> str:
    """Light, safe normalisation for the exact-match fast path: strip `$`, spaces, `\\left`/`\\right`,
    `\\dfrac`->`\\frac`, `^\\circ`, trailing full stop, thousands commas in plain numbers, leading zeros of
    integers (AIME "025" == "25") and a trailing ".0" (AMC "27.0" == "27")."""
    s = ans.strip().strip("$").strip()
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "").replace(" ", "")
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.0*", s):
        s = s.split(".")[0]
    if re.fullmatch(r"-?\d+", s):
        s = str(int(s))
    return s


_SCI = re.compile(r"(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)")
_SCI_LATEX = re.compile(r"(-?\d+(?:\.\d+)?)(?:\\times|\\cdot)10\^\{?([+-]?\d+)\}?")


def sci_to_latex(ans: str) -> str:
    """`8.7e8` -> `8.7 \\times 10^{8}`: 35 Minerva golds use e-notation, which Math-Verify's LaTeX parser does not
    read as a number (it would compare it with `8.7 \\times 10^{8}` as unequal)."""
    m = _SCI.fullmatch(ans.strip().strip("$").strip())
    return f"{m.group(1)} \\times 10^{{{int(m.group(2))}}}" if m else ans


def _as_number(s: str) -> float | None:
    """Value of a plain decimal, `a/b`, `\\frac{a}{b}`, `1e5` or `1\\times10^{5}` string (already normalised),
    else None."""
    m = _SCI.fullmatch(s) or _SCI_LATEX.fullmatch(s)
    if m:
        return float(m.group(1)) * 10.0 ** int(m.group(2))
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s) or re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        den = float(m.group(3))
        return None if den == 0 else (-1.0 if m.group(1) else 1.0) * float(m.group(2)) / den
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", s):
        return float(s)
    return None


def quick_match(pred: str, gold: str) -> bool:
    """True when pred and gold are equal after `normalize_answer`, or both plain numbers/fractions equal to
    1e-6 relative. False means "not obviously equal" (Math-Verify decides), not "different"."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p == g and p != "":
        return True
    pn, gn = _as_number(p), _as_number(g)
    return pn is not None and gn is not None and abs(pn - gn) <= 1e-6 * max(1.0, abs(gn))


def grade(response: str, gold: str, *, timeout: float = 3.0) -> bool:
    """Is the final answer of `response` equal to `gold`? Math-Verify runs in a worker process, killed after
    `timeout` seconds (a timed-out pair counts as wrong)."""
    return grade_many([response], [gold], timeout=timeout)[0]


def grade_many(responses: list[str], golds: list[str], *, timeout: float = 3.0, progress=False,
               pool: VerifierPool | None = None) -> list[bool]:
    """Grade responses[i] against golds[i]; returns a list of bools of the same length.

    Pairs settled by `quick_match` or without an extractable answer never reach the worker pool.
    `progress`: show a progress bar (True) or pass a tqdm description string.
    """
    if len(responses) != len(golds):
        raise ValueError(f"grade_many: responses ({len(responses)}) and golds ({len(golds)}) differ in length")
    if timeout <= 0:
        raise ValueError(f"grade_many: timeout must be > 0 seconds, got {timeout}")
    verdicts: list[bool] = [False] * len(responses)
    pending: list[tuple[int, str, str]] = []
    for i, (resp, gold) in enumerate(zip(responses, golds)):
        gold = str(gold)
        pred = extract_answer(resp)
        if pred is None:
            continue
        if quick_match(pred, gold):
            verdicts[i] = True
        else:
            pending.append((i, pred, gold))
    if pending:
        pool = pool or shared_pool()
        pairs = [(sci_to_latex(p), sci_to_latex(g)) for _, p, g in pending]
        results = pool.verify_many(pairs, timeout=timeout, progress=progress)
        for (i, _, _), ok in zip(pending, results):
            verdicts[i] = ok
    return verdicts
