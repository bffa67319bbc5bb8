"""LongBench v2 scoring: pred.py's answer extraction, accuracy per sample, result.py's table.

- ``extract_answer`` = pred.py ``extract_answer`` (THUDM/LongBench at 2e00731): asterisks removed, then the first
  "The correct answer is (X)", else the first "The correct answer is X", X in A-D; case-sensitive; None if neither.
- ``judge`` = pred.py: ``item['pred'] == item['answer']`` on the stripped response.
- ``aggregate`` = result.py: per prediction list, accuracy x100 rounded to one decimal overall, by difficulty
  (anything but 'easy' counts as hard) and by length (anything but 'short' / 'medium' counts as long);
  ``compensated=True`` is result.py's switch (off there) giving 0.25 to a response with no extractable answer.
  An empty bucket is NaN here (result.py divides by zero).

tests/fixtures/longbench_v2/metric_cases.json holds the official code's outputs on fixed cases.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_BARE = re.compile(r"The correct answer is ([A-D])")
COLUMNS: tuple[str, ...] = ("overall", "easy", "hard", "short", "medium", "long")  # result.py's, in its order


def extract_answer(response: str) -> str | None:
    response = response.replace("*", "")
    match = _PAREN.search(response) or _BARE.search(response)
    return match.group(1) if match else None


def judge(prediction: str, answer: str) -> bool:
    """Whether the answer extracted from the stripped prediction is the record's answer letter."""
    return extract_answer(prediction.strip()) == answer


def _percent(total: float, n: int) -> float:
    return round(100 * total / n, 1) if n else float("nan")


def aggregate(predictions: Iterable[Mapping], compensated: bool = False) -> dict[str, float]:
    """result.py's row for one prediction list: ``{overall, easy, hard, short, medium, long}`` (x100, 1 decimal).

    Each prediction has ``difficulty``, ``length``, ``judge`` (bool or 0/1) and ``pred`` (the extracted letter or
    None; read only when ``compensated``)."""
    sums = dict.fromkeys(("easy", "hard", "short", "medium", "long"), 0.0)
    counts = dict.fromkeys(sums, 0)
    n = 0
    for p in predictions:
        acc = 0.25 if compensated and p["pred"] is None else int(p["judge"])
        difficulty = "easy" if p["difficulty"] == "easy" else "hard"
        length = p["length"] if p["length"] in ("short", "medium") else "long"
        for bucket in (difficulty, length):
            sums[bucket] += acc
            counts[bucket] += 1
        n += 1
    out = {"overall": _percent(sums["easy"] + sums["hard"], n)}
    out.update({b: _percent(sums[b], counts[b]) for b in sums})
    return out
