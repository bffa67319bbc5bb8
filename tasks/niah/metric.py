"""The Needle-in-a-Haystack score as NVIDIA/kvpress computes it (evaluation/benchmarks/needle_in_haystack/
calculate_metrics.py, kvpress commit 8bb29b9c3078452a86d692f29123fa6c793e2b05)::

    Rouge().get_scores(row["needle"].strip(), row["predicted_answer"].strip())[0]

with the PyPI ``rouge`` package (pltrdy's, kvpress's ``eval`` extra: ``rouge>=1.0.1,<2``; ours is pinned to 1.0.1
for LongBench). Note the argument order: ``get_scores(hyps, refs)``, so the *needle* is the hypothesis and the
prediction the reference. kvpress keeps the whole dict (``rouge-1`` / ``rouge-2`` / ``rouge-l``, each ``f`` / ``p``
/ ``r``) and reports no single number; a kvbench row needs one score in [0, 1], chosen by the task parameter
``metric`` (``<rouge>/<stat>``, default ``rouge-l/f``). F is symmetric, so the swapped order does not matter for
it; for ``p`` and ``r`` it does: ``p`` is the share of the needle's n-grams found in the prediction (the needle's
recall), ``r`` the share of the prediction's n-grams that are the needle's.

The package tokenizes by splitting on ``"."`` (sentences) and whitespace, nothing else: case and every other
punctuation mark count (``Francisco,`` is not ``Francisco``). It raises ``ValueError`` for an empty hypothesis or
reference (an empty prediction, or one of periods and spaces only), which would stop kvpress's whole metric
computation; here such a prediction scores 0.0.
"""
from __future__ import annotations

from harness.errors import KvbenchError

ROUGE_METRICS = ("rouge-1", "rouge-2", "rouge-l")  # what Rouge() computes by default (DEFAULT_METRICS)
ROUGE_STATS = ("f", "p", "r")
METRICS = tuple(f"{m}/{s}" for m in ROUGE_METRICS for s in ROUGE_STATS)
DEFAULT_METRIC = "rouge-l/f"


def kvpress_rouge(needle: str, prediction: str) -> dict[str, dict[str, float]] | None:
    """kvpress's per-sample result, ``{"rouge-1": {"r", "p", "f"}, "rouge-2": ..., "rouge-l": ...}``; None where
    the ``rouge`` package raises (an empty prediction: kvpress would stop there)."""
    from rouge import Rouge

    try:
        return Rouge().get_scores(needle.strip(), prediction.strip())[0]
    except (ValueError, RecursionError):  # empty text; rouge-l's recursive LCS on a very long prediction
        return None


def check_metric(metric: object) -> str:
    if metric not in METRICS:
        raise KvbenchError(f"niah: task.metric={metric!r} is not known; allowed: {', '.join(METRICS)} "
                           "(kvpress's ROUGE of the needle against the prediction)")
    return str(metric)


def niah_score(needle: str, prediction: str, metric: str = DEFAULT_METRIC) -> float:
    """One number of kvpress's result, ``metric`` = ``<rouge>/<stat>``; 0.0 where kvpress's call raises."""
    name, stat = check_metric(metric).split("/")
    scores = kvpress_rouge(needle, prediction)
    return 0.0 if scores is None else float(scores[name][stat])


__all__ = ["kvpress_rouge", "niah_score", "check_metric", "METRICS", "DEFAULT_METRIC", "ROUGE_METRICS",
           "ROUGE_STATS"]
