"""Durable outputs: rows are appended one JSON line at a time with flush + fsync; whole files are written to a
temporary file and renamed into place. A run killed at any moment leaves at worst a torn last line, which
``read_rows`` drops (and ``RowStore`` cuts off) instead of parsing it as data.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from harness.errors import KvbenchError


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_rows(path: str | Path) -> tuple[list[dict], int]:
    """Rows of a jsonl file and the byte length of its valid prefix.

    Only a final line without its newline can be torn by a kill; it is dropped. A malformed line elsewhere
    is corruption, reported with its line number.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    rows: list[dict] = []
    valid = 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        complete = lineno < len(lines)  # the last element follows the final newline (empty if the file is whole)
        if not raw.strip():
            if complete:
                valid += len(raw) + 1
            continue
        if not complete:
            break  # torn last line: written without its newline, never data
        try:
            rows.append(json.loads(raw))
        except json.JSONDecodeError:
            raise KvbenchError(f"{path}: line {lineno} is not valid JSON; fix or remove that line") from None
        valid += len(raw) + 1
    return rows, valid


class RowStore:
    """Append-only ``predictions.jsonl`` with resume: knows which row keys are already written."""

    KEY = ("task", "sample_id", "method", "keep_ratio")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        rows, valid = read_rows(self.path)
        if self.path.exists() and self.path.stat().st_size != valid:
            with open(self.path, "r+b") as fh:  # cut the torn tail so appends start on a clean line
                fh.truncate(valid)
                fh.flush()
                os.fsync(fh.fileno())
        self.rows = rows
        self.done = {self.key(r) for r in rows}

    @classmethod
    def key(cls, row: dict) -> tuple:
        return tuple(round(row[k], 6) if k == "keep_ratio" else row[k] for k in cls.KEY)

    def append(self, rows: Iterable[dict]) -> None:
        rows = [r for r in rows if self.key(r) not in self.done]
        if not rows:
            return
        payload = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.extend(rows)
        self.done.update(self.key(r) for r in rows)
