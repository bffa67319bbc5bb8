"""Aggregation of rows into scores: per task the mean per-sample score x 100 (as RULER and LongBench report),
the mean over tasks, and failed samples counted, never averaged in."""
from __future__ import annotations

from collections import defaultdict


def summarize(rows: list[dict]) -> dict:
    """``{"<keep_ratio>": {"tasks": {task: score}, "mean": score, "n": n_ok, "n_errors": n_failed}}`` per method."""
    by = defaultdict(lambda: defaultdict(list))
    errors = defaultdict(int)
    methods = set()
    for r in rows:
        key = (r["method"], round(float(r["keep_ratio"]), 6))
        methods.add(r["method"])
        if r.get("error") is not None or r.get("score") is None:
            errors[key] += 1
            continue
        by[key][r["task"]].append(float(r["score"]))
    out: dict = {}
    for key in sorted(set(by) | set(errors)):
        method, ratio = key
        task_scores = {t: 100.0 * sum(v) / len(v) for t, v in sorted(by[key].items())}
        entry = {
            "tasks": task_scores,
            "mean": sum(task_scores.values()) / len(task_scores) if task_scores else None,
            "n": sum(len(v) for v in by[key].values()),
            "n_errors": errors[key],
        }
        out.setdefault(method, {})[f"{ratio:g}"] = entry
    return out
