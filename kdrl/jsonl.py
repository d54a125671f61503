"""Append-only JSONL files that survive a crash, shared by the trainer's logs and the evaluation harness's samples.

Whole records are appended and synced to the disk (:func:`append_lines`). A kill or a full disk in the middle of an
append leaves a last line without its newline; :func:`split_lines` tells such a partial line from a whole record that
only lost its newline, so a reader can cut the one and keep the other.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["append_lines", "split_lines"]


def append_lines(path: str | Path, text: str) -> None:
    """Append ``text`` (whole records, each ending in a newline) to ``path`` and flush it to the disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def split_lines(raw: bytes, is_record: Callable[[bytes], bool]) -> tuple[list[bytes], bytes]:
    """``(lines, partial)`` of a JSONL file's bytes ``raw``: its lines, and the last line when it has no newline and
    is not a whole record by ``is_record`` (``b""`` when there is no such line). A last line without its newline that
    is a whole record is the last of ``lines``."""
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when raw ends with a newline
    if tail.strip() and is_record(tail):
        return lines + [tail], b""
    return lines, tail
