"""Scores of a recited number: how much of a long digit string a prediction reproduces, graded.

Both read the prediction's number the same way (``recited_digits``): its first run of digits, single spaces,
commas or hyphens between digit groups allowed (``4123 8817-06`` reads ``4123881706``); whatever follows the run
(a period, a sentence, another number) is not part of the answer.

``chunks`` (the default): the reference is cut into consecutive chunks of ``chunk`` digits (the last one takes the
remainder, so it holds ``chunk`` to ``2 * chunk - 1`` digits); the score is the largest share of chunks found in
the recited digits in their order and without overlapping (a longest common subsequence of chunks). A skip loses
the chunks skipped, a loop back repeats chunks already counted, a wrong digit costs the chunk it falls in, and
copying resumes counting where it lines up again. A random 8-digit chunk turns up by chance about once in 10^8
places, so an unrelated number scores ~0.

``prefix``: the longest correct prefix of the recited digits, as a share of the reference's digits: the first
error ends the credit (copying that goes astray once is worth what came before it).
"""
from __future__ import annotations

import os

import re

from harness.errors import KvbenchError

METRICS = ("chunks", "prefix")
DEFAULT_METRIC = "chunks"
DEFAULT_CHUNK = 8
_RUN = re.compile(r"\d+(?:[ ,\-]\d+)*")


def recited_digits(prediction: str) -> str:
    """The digits of the prediction's first digit run (single separators ' ', ',', '-' inside it allowed)."""
    m = _RUN.search(prediction)
    return re.sub(r"\D", "", m.group(0)) if m else ""


def chunk_bounds(n_digits: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of a reference of ``n_digits``: ``chunk`` digits each, the remainder joining the
    last one (a short tail would be found by chance)."""
    if chunk < 1 or n_digits < chunk:
        raise KvbenchError(f"a reference of {n_digits} digits has no chunk of {chunk}; chunk must be 1..{n_digits}")
    starts = list(range(0, n_digits - chunk + 1, chunk))
    ends = starts[1:] + [n_digits]
    return list(zip(starts, ends))


def chunk_score(recited: str, reference: str, chunk: int = DEFAULT_CHUNK) -> float:
    """Share of the reference's chunks in ``recited`` in order, non-overlapping (longest chain)."""
    bounds = chunk_bounds(len(reference), chunk)
    hits = []  # (position in recited, end in recited, chunk index) of every occurrence of every chunk
    for j, (b, e) in enumerate(bounds):
        piece = reference[b:e]
        at = recited.find(piece)
        while at >= 0:
            hits.append((at, at + len(piece), j))
            at = recited.find(piece, at + 1)
    hits.sort()
    best = [0] * len(hits)  # longest chain ending with hit i
    for i, (start, _, j) in enumerate(hits):
        best[i] = 1 + max((best[k] for k in range(i) if hits[k][1] <= start and hits[k][2] < j), default=0)
    return max(best, default=0) / len(bounds)


def prefix_score(recited: str, reference: str) -> float:
    """Longest common prefix of ``recited`` and ``reference``, as a share of the reference's length."""
    return len(os.path.commonprefix([recited, reference])) / len(reference)


def check_metric(metric: object) -> str:
    if metric not in METRICS:
        raise KvbenchError(f"longgen/recite: task.metric={metric!r} is not known; allowed: {', '.join(METRICS)} "
                           "(chunks: share of the number's chunks recited in order; prefix: longest correct prefix)")
    return str(metric)


def recite_score(prediction: str, reference: str, metric: str = DEFAULT_METRIC, chunk: int = DEFAULT_CHUNK) -> float:
    """The score in [0, 1] of ``prediction`` reciting the digit string ``reference``."""
    recited = recited_digits(prediction)
    if check_metric(metric) == "prefix":
        return prefix_score(recited, reference)
    return chunk_score(recited, reference, chunk)


__all__ = ["METRICS", "DEFAULT_METRIC", "DEFAULT_CHUNK", "recited_digits", "chunk_bounds", "chunk_score",
           "prefix_score", "check_metric", "recite_score"]
