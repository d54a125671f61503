"""Answer extraction and grading for math problems.

`extract_answer` pulls the final answer out of a model response (last brace-matched `\\boxed{}` / `\\fbox{}`,
then "the answer is ...", then the last number). `grade` / `grade_many` compare it with a gold answer: a cheap
exact / numeric check first, then Math-Verify (sympy) in a separate worker process with our own per-pair timeout,
so that a pathological answer (say a huge power tower) can neither hang the run nor exhaust memory.

Two rules beyond extraction order. Truncation: callers say which responses hit the token limit (`truncated=`);
such a response is credited only from a closed box, never from "the answer is ..." or its last number, and no
response is ever credited from an unclosed box. List golds: `-2, 3` is also matched by the last two boxes
(`\\boxed{-2} and \\boxed{3}`); a scalar gold is matched by the last box only (a model may correct itself).

Safety: model output is never passed to eval/exec. Math-Verify is given only its LaTeX extractor; its plain
"expression" extractor goes through `sympy.parse_expr`, which evaluates Python, so it is not used.
Math-Verify's own timeouts use signals (main thread only); they are disabled and the worker is killed instead.
"""
from __future__ import annotations

import re

from kdrl.verify_pool import VerifierPool, shared_pool

__all__ = ["answer_candidates", "extract_answer", "extract_boxed", "find_boxes", "gold_items", "grade", "grade_many",
           "normalize_answer", "quick_match", "sci_to_latex", "top_level_boxes"]

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


def find_boxes(text: str) -> list[tuple[int, int, str | None]]:
    """(start, end, content) of every `\\boxed`/`\\fbox` in order, nested ones included; content None for an
    unfinished box: a `{` that never closes, or `\\boxed` at the very end of the text. `\\boxed 5` is a box."""
    out = []
    for m in _BOXED.finditer(text):
        end = m.end()
        if end < len(text) and text[end] == "{":
            inner = _braced(text, end)
            out.append((m.start(), end + 2 + len(inner) if inner is not None else len(text),
                        inner.strip() if inner is not None else None))
        elif m.group(0).endswith(" ") and (token := re.match(r"[^\s$.,]+", text[end:])):
            out.append((m.start(), end + token.end(), token.group(0)))
        elif not text[end:].strip():
            out.append((m.start(), len(text), None))  # "... \\boxed" and then the text stops
    return out


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces matched; `\\boxed 5` accepted).

    None when there is no box, or when any box is unfinished: an unclosed box runs to the end of the text, so it
    is the model's final answer and that answer is incomplete (an earlier closed box is not its answer either).
    """
    boxes = find_boxes(text)
    if not boxes or any(inner is None for _, _, inner in boxes):
        return None
    return boxes[-1][2]


def top_level_boxes(text: str) -> list[str] | None:
    """Contents of the boxes not nested in another box, in order; None if any box is unfinished."""
    out, covered = [], -1
    for start, end, inner in find_boxes(text):
        if inner is None:
            return None
        if start >= covered:
            out.append(inner)
            covered = end
    return out


def extract_answer(text: str, *, truncated: bool) -> str | None:
    """Final answer of a model response, or None.

    Order (as Qwen2.5-Math's evaluation): last `\\boxed{}`/`\\fbox{}`; else the text after the last
    "the answer is" up to the end of its sentence; else the last number in the text.
    `truncated`: the response was cut at the token limit. Then only a closed box counts: the sentence and the
    last number of a cut response may be the start of a longer answer (3/4 of "3/40"). A response with an
    unclosed box has no answer, truncated or not (see `extract_boxed`).
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer: text must be str, got {type(text).__name__}")
    if not isinstance(truncated, bool):
        raise TypeError(f"extract_answer: truncated must be a bool, got {type(truncated).__name__}")
    boxes = find_boxes(text)
    if boxes:
        return extract_boxed(text)  # None if a box is unfinished: no fallback reads inside it
    if truncated:
        return None
    hits = list(_ANSWER_IS.finditer(text))
    if hits:
        tail = text[hits[-1].end():]
        # The sentence ends at a newline or a full stop followed by a space/end (not a decimal point).
        sentence = re.split(r"\n|\.(?=\s|$)", tail, maxsplit=1)[0].strip().strip("$").strip()
        if sentence:
            return sentence if sentence.count("{") == sentence.count("}") else None  # unbalanced: unfinished
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].rstrip(".")
    return None


def gold_items(gold: str) -> list[str]:
    """The answers of a list gold (`-2, 3` -> ['-2', '3']): split at commas outside brackets, so a tuple
    `(3, \\frac{\\pi}{2})`, an interval `[-2,5)` and a thousands-separated number `1,250` are one item."""
    s = gold.strip().strip("$").strip().replace("\\left", "").replace("\\right", "")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s.replace(" ", "")):
        return [s]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(s[start:i].strip())
            start = i + 1
    items.append(s[start:].strip())
    return [it for it in items if it]


def answer_candidates(text: str, gold: str, *, truncated: bool) -> list[str]:
    """The answers of `text` to compare with `gold` (credit if any matches): `extract_answer`, plus, when the
    gold is a list of k >= 2 answers, the last k top-level boxes joined with ", " (`\\boxed{-2} and \\boxed{3}`
    for `-2, 3`). For a scalar gold only the last box counts, so a self-correction (`\\boxed{25}` ... `\\boxed{24}`)
    is graded by its final box."""
    first = extract_answer(text, truncated=truncated)
    if first is None:
        return []  # no answer, or an unfinished box: no joined boxes either
    out = [first]
    k = len(gold_items(gold))
    boxes = top_level_boxes(text) if k >= 2 else None
    if boxes and len(boxes) >= k:
        joined = ", ".join(boxes[-k:])
        if joined != first:
            out.append(joined)
    return out


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


def grade(response: str, gold: str, *, truncated: bool, timeout: float = 3.0) -> bool:
    """Is the final answer of `response` equal to `gold`? `truncated`: the response hit the token limit (see
    `extract_answer`). Math-Verify runs in a worker process, killed after `timeout` seconds (then wrong)."""
    return grade_many([response], [gold], truncated=[truncated], timeout=timeout)[0]


def _truncation_flags(truncated, n: int) -> list[bool]:
    if isinstance(truncated, bool):
        return [truncated] * n
    if isinstance(truncated, (str, bytes)) or not hasattr(truncated, "__len__"):
        raise TypeError(f"grade_many: truncated must be a bool or a list of bools, got {type(truncated).__name__}")
    flags = list(truncated)
    if len(flags) != n:
        raise ValueError(f"grade_many: truncated ({len(flags)}) and responses ({n}) differ in length")
    bad = [type(t).__name__ for t in flags if not isinstance(t, bool)]
    if bad:
        raise TypeError(f"grade_many: truncated must hold bools (True: cut at the token limit), got {bad[0]}")
    return flags


def grade_many(responses: list[str], golds: list[str], *, truncated, timeout: float = 3.0, progress=False,
               pool: VerifierPool | None = None) -> list[bool]:
    """Grade responses[i] against golds[i]; returns a list of bools of the same length.

    truncated: one bool per response (or one bool for all): True where generation stopped at the token limit.
    A truncated response is credited only from a closed box (see `extract_answer`); no response is credited from
    an unclosed one. A list gold may also be matched by several boxes (see `answer_candidates`).
    Pairs settled by `quick_match` or without an extractable answer never reach the worker pool.
    `progress`: show a progress bar (True) or pass a tqdm description string.
    """
    if len(responses) != len(golds):
        raise ValueError(f"grade_many: responses ({len(responses)}) and golds ({len(golds)}) differ in length")
    if timeout <= 0:
        raise ValueError(f"grade_many: timeout must be > 0 seconds, got {timeout}")
    flags = _truncation_flags(truncated, len(responses))
    verdicts: list[bool] = [False] * len(responses)
    pending: list[tuple[int, str, str]] = []
    for i, (resp, gold, cut) in enumerate(zip(responses, golds, flags)):
        gold = str(gold)
        candidates = answer_candidates(resp, gold, truncated=cut)
        if any(quick_match(pred, gold) for pred in candidates):
            verdicts[i] = True
        else:
            pending += [(i, pred, gold) for pred in candidates]
    if pending:
        pool = pool or shared_pool()
        pairs = [(sci_to_latex(p), sci_to_latex(g)) for _, p, g in pending]
        results = pool.verify_many(pairs, timeout=timeout, progress=progress)
        for (i, _, _), ok in zip(pending, results):
            verdicts[i] = verdicts[i] or ok
    return verdicts
