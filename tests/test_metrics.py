"""One score aggregation: a run's metrics.json (``harness.metrics.summarize``) and the report (``score_table``,
``pivot_scores``) compute the same numbers the same way."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.metrics import summarize

RUNS = Path(__file__).parent / "fixtures" / "report" / "runs"


def _row(task, score, method="snapkv", ratio=0.5, error=None):
    return {"task": task, "method": method, "keep_ratio": ratio, "model": "m", "score": score, "error": error,
            "sample_id": "s"}


def test_summarize_hand_computed():
    rows = [_row("a", 1.0), _row("a", 0.0),  # a: 50
            _row("b", 1.0), _row("b", None),  # b: 100, one failed (no score)
            _row("c", 0.5, error="CUDA out of memory"),  # c: failed only -> no score, never averaged in
            _row("a", 0.25, ratio=0.25), _row("a", 0.75, method="knorm", ratio=0.5000000001)]
    got = summarize(rows)
    assert list(got) == ["knorm", "snapkv"]  # methods sorted, ratios ascending
    assert list(got["snapkv"]) == ["0.25", "0.5"]
    assert got["snapkv"]["0.5"] == {"tasks": {"a": 50.0, "b": 100.0}, "mean": 75.0, "n": 3, "n_errors": 2}
    assert got["snapkv"]["0.25"] == {"tasks": {"a": 25.0}, "mean": 25.0, "n": 1, "n_errors": 0}
    assert got["knorm"] == {"0.5": {"tasks": {"a": 75.0}, "mean": 75.0, "n": 1, "n_errors": 0}}  # ratio rounded
    only_failed = summarize([_row("a", None), _row("b", 1.0, error="x")])
    assert only_failed == {"snapkv": {"0.5": {"tasks": {}, "mean": None, "n": 0, "n_errors": 2}}}
    assert summarize([]) == {}


def test_run_metrics_equal_the_report():
    from harness.report import load_rows, pivot_scores, score_table

    df = load_rows(RUNS)
    checked = 0
    for model, sub in df.groupby("model"):
        rows = sub[["task", "method", "keep_ratio", "score", "error"]].to_dict("records")
        rows = [{**r, "score": None if r["score"] != r["score"] else r["score"]} for r in rows]  # NaN -> None
        metrics = summarize(rows)
        table = score_table(sub)
        wide = pivot_scores(table)[model]
        for (method, ratio), line in wide.iterrows():
            entry = metrics[method][f"{ratio:g}"]
            assert entry["mean"] == line["mean"]
            assert entry["tasks"] == {t: line[t] for t in entry["tasks"]}
            cell = table[(table["method"] == method) & (table["keep_ratio"] == ratio)]
            assert (entry["n"], entry["n_errors"]) == (int(cell["n"].sum()), int(cell["n_errors"].sum()))
            checked += 1
    assert checked >= 4


def test_a_string_score_is_not_a_number():
    with pytest.raises(ValueError):
        summarize([_row("a", "high")])
