"""Every `evals/run.py` argument checked before any work starts (no model loaded, no folder created).

A bad value raises :class:`UsageError` naming the option, the value and what is expected; `evals/run.py` prints
it as one line and exits 2. The checks only read the file system, so a refused run leaves nothing behind.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from evals.tasks import parse_tasks
from kdrl.models import REGISTRY

__all__ = ["UsageError", "Parser", "check_args", "safe_name", "check_writable_dir"]

# Run folder names: letters, digits and . _ + = @ -, starting with a letter or digit (so never a hidden file, an
# option-looking "-x", or a path).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]*")


class UsageError(ValueError):
    """A bad argument or setting, found before the run starts."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as UsageError: one line from the command, not a usage block plus a message."""

    def error(self, message):
        raise UsageError(message)


def safe_name(text: str) -> str:
    """`text` as a run folder name: runs of other characters become one '-', and the name starts with a letter or
    digit (an absolute model path gave '-home-...' before)."""
    name = re.sub(r"[^A-Za-z0-9._+=@-]+", "-", text)
    return re.sub(r"^[^A-Za-z0-9]+", "", name) or "run"


def check_writable_dir(path: Path, option: str) -> None:
    """`path` is a directory we can write into, or can be created: its nearest existing ancestor is a writable
    directory. Creates nothing."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == p else f"cannot be created: {probe} is a file"
        raise UsageError(f"{option} {path}: {what}; expected a directory")
    try:  # a real write, not os.access: that says yes to root everywhere, /proc included
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot write in {probe} ({err.strerror})") from None


def _check_model(model: str) -> None:
    """A registry name, a local model directory, or something shaped like a hub id (org/name); a path that does not
    exist is refused here rather than after the banner."""
    if model in REGISTRY:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {model}: directory has no config.json (not a transformers model directory)")
        return
    expected = f"a local model directory, a registry name ({', '.join(sorted(REGISTRY))}) or a hub id (org/name)"
    if path.exists():
        raise UsageError(f"--model {model}: is a file; expected {expected}")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model):
        raise UsageError(f"--model {model}: no such directory; expected {expected}")
    if not model or model.startswith("-") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise UsageError(f"--model {model!r}: not a valid name; expected {expected}")


def _positive(option: str, value, allow_zero: bool = False, integer: bool = False) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise UsageError(f"{option} {value}: expected {kind} {'>= 0' if allow_zero else '> 0'}")


def check_args(args) -> list[str]:
    """Check the parsed arguments of evals/run.py; returns the task list. Raises UsageError on the first problem."""
    try:
        tasks = parse_tasks(args.tasks)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _positive("--limit", args.limit, integer=True)
    _positive("--n", args.n, integer=True)
    _positive("--max-new-tokens", args.max_new_tokens, integer=True)
    _positive("--batch-size", args.batch_size, integer=True)
    _positive("--chunk-size", args.chunk_size, integer=True)
    _positive("--num-fewshot", args.num_fewshot, allow_zero=True, integer=True)
    _positive("--temperature", args.temperature, allow_zero=True)
    _positive("--save-every", args.save_every, allow_zero=True)
    _positive("--grade-timeout", args.grade_timeout)
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise UsageError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    if args.n > 1 and args.temperature == 0:
        raise UsageError(f"--n {args.n} needs --temperature > 0 (greedy samples would all be the same)")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: expected an integer >= 0")
    if args.run_name is not None and not _NAME.fullmatch(args.run_name):
        raise UsageError(f"--run-name {args.run_name!r}: expected a folder name of letters, digits and . _ + = @ -, "
                         "starting with a letter or digit")
    if args.baseline is not None:
        base = Path(args.output_dir) / args.baseline / "results.json"
        if not _NAME.fullmatch(args.baseline) or not base.is_file():
            runs = sorted(p.parent.name for p in Path(args.output_dir).glob("*/results.json"))
            raise UsageError(f"--baseline {args.baseline}: no results.json for that run in {args.output_dir}; "
                             f"runs there: {', '.join(runs) or 'none'}")
    _check_model(args.model)
    check_writable_dir(Path(args.output_dir), "--output-dir")
    return tasks


def fail(message: str, prog: str = "evals/run.py") -> int:
    """Print a usage error as one line on stderr; the exit status for it (2, as argparse uses)."""
    print(f"{prog}: error: {message} (--help for usage)", file=sys.stderr, flush=True)
    return 2
