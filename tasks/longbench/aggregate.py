"""LongBench aggregation for the report: official per-dataset scores, README categories, LongBench-E buckets.

Rows are dicts (or DataFrame records) with ``task`` ('longbench/qasper', 'longbench_e/qasper'), ``score``
(the per-sample score in [0, 1]; None for a failed sample, which is left out) and ``meta``.

- ``dataset_scores``: eval.py ``scorer``: ``round(100 * total / n, 2)`` per dataset.
- ``e_bucket_table``: eval.py ``scorer_e``: ``round(100 * np.mean(bucket), 2)`` per dataset and length bucket
  (NaN for an empty bucket, as np.mean gives).
- ``category_table``: README leaderboard: per category the mean of its datasets' scores, and ``Avg`` = the
  mean of the category means. ``language="en"`` / ``"zh"`` reproduce the README's English / Chinese tables
  (code datasets count in both); ``None`` uses every dataset present.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping

from tasks.longbench.config import CATEGORIES, CATEGORY, E_BUCKETS, LANGUAGE, length_bucket

AVG = "Avg"


def _split(task: str) -> tuple[str, str]:
    suite, _, dataset = str(task).partition("/")
    return suite, dataset


def _meta(row: Mapping[str, Any]) -> dict:
    meta = row.get("meta")
    return meta if isinstance(meta, dict) else {}


def _valid(score: Any) -> bool:
    return score is not None and not (isinstance(score, float) and math.isnan(score))


def dataset_scores(rows: Iterable[Mapping[str, Any]], suite: str = "longbench") -> dict[str, float]:
    """Per dataset of ``suite``: the official score x100 rounded to 2 decimals (eval.py ``scorer``)."""
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        row_suite, dataset = _split(row["task"])
        if row_suite != suite or not _valid(row.get("score")):
            continue
        totals[dataset] += float(row["score"])
        counts[dataset] += 1
    return {d: round(100 * totals[d] / counts[d], 2) for d in sorted(totals)}


def category_table(scores: Mapping[str, float], language: str | None = None) -> dict[str, float]:
    """README category means and their average from per-dataset scores (x100).

    Categories without a scored dataset are left out; ``Avg`` is over the categories present (the README
    average when all six are). Keys of ``scores`` may be 'qasper' or 'longbench/qasper'.
    """
    if language not in (None, "en", "zh"):
        raise ValueError(f"language={language!r}; allowed: None, 'en', 'zh'")
    by_cat: dict[str, list[float]] = defaultdict(list)
    for name, value in scores.items():
        dataset = _split(name)[1] if "/" in name else name
        if dataset not in CATEGORY or not _valid(value):
            continue
        if language is not None and LANGUAGE[dataset] not in (language, "code"):
            continue
        by_cat[CATEGORY[dataset]].append(float(value))
    table = {c: sum(by_cat[c]) / len(by_cat[c]) for c in CATEGORIES if by_cat.get(c)}
    if table:
        table[AVG] = sum(table.values()) / len(table)
    return table


def _bucket_of(row: Mapping[str, Any]) -> str | None:
    meta = _meta(row)
    if meta.get("length_bucket") in E_BUCKETS:
        return meta["length_bucket"]
    if meta.get("length") is not None:
        return length_bucket(meta["length"])
    return None


def e_bucket_table(rows: Iterable[Mapping[str, Any]], suite: str = "longbench_e") -> dict[str, dict[str, float]]:
    """Per LongBench-E dataset, per bucket '0-4k' / '4-8k' / '8k+': official score x100 (eval.py ``scorer_e``)."""
    import numpy as np

    buckets: dict[str, dict[str, list[float]]] = defaultdict(lambda: {b: [] for b in E_BUCKETS})
    for row in rows:
        row_suite, dataset = _split(row["task"])
        if row_suite != suite or not _valid(row.get("score")):
            continue
        bucket = _bucket_of(row)
        if bucket is None:
            raise ValueError(f"{row['task']} row has neither meta.length_bucket nor meta.length")
        buckets[dataset][bucket].append(float(row["score"]))
    out = {}
    for dataset in sorted(buckets):
        out[dataset] = {b: (round(100 * float(np.mean(v)), 2) if v else float("nan"))
                        for b, v in buckets[dataset].items()}
    return out


def e_category_buckets(table: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean per category and bucket of an ``e_bucket_table`` (README's LongBench-E curve), plus 'All'."""
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, list[str]] = defaultdict(list)
    for dataset in table:
        groups[CATEGORY[dataset]].append(dataset)
    for name, members in [(c, groups[c]) for c in CATEGORIES if groups.get(c)] + [("All", list(table))]:
        out[name] = {}
        for b in E_BUCKETS:
            vals = [table[d][b] for d in members if _valid(table[d].get(b))]
            out[name][b] = sum(vals) / len(vals) if vals else float("nan")
    return out


# ------------------------------------------------------------------------------------------ report section
def _fmt(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _md(index_names: list[str], columns: list[str], rows: list[tuple[tuple, list]]) -> str:
    lines = ["| " + " | ".join(index_names + columns) + " |", "|" + "---|" * (len(index_names) + len(columns))]
    for idx, vals in rows:
        lines.append("| " + " | ".join([str(i) for i in idx] + [_fmt(v) for v in vals]) + " |")
    return "\n".join(lines)


def report_section(df) -> str | None:
    """Markdown: LongBench category means and README averages, LongBench-E buckets, per (model, method, ratio)."""
    if df is None or "task" not in df or not len(df):
        return None
    tasks = df["task"].astype(str)
    sub = df[tasks.str.startswith("longbench/") | tasks.str.startswith("longbench_e/")]
    if not len(sub):
        return None
    if "failed" in sub:
        sub = sub[~sub["failed"].astype(bool)]
    keys = [k for k in ("model", "method", "keep_ratio") if k in sub]
    groups = sub.groupby(keys, sort=True) if keys else [((), sub)]
    lb_rows, e_rows = [], []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        records = g[["task", "score", "meta"]].to_dict("records")
        scores = dataset_scores(records)
        if scores:
            cats = category_table(scores)
            en, zh = category_table(scores, "en"), category_table(scores, "zh")
            lb_rows.append((key, [cats.get(c) for c in CATEGORIES] + [cats.get(AVG), en.get(AVG), zh.get(AVG),
                                                                     float(len(scores))]))
        table = e_bucket_table(records)
        if table:
            allb = e_category_buckets(table)["All"]
            e_rows.append((key, [allb[b] for b in E_BUCKETS] + [float(len(table))]))
    parts = []
    if lb_rows:
        parts.append("## LongBench: category means (x100) and README averages\n\n"
                     "Avg = mean of the category means over all datasets present; Avg (en) / Avg (zh) as the "
                     "README's English / Chinese leaderboards (code counts in both). n = datasets scored.\n\n"
                     + _md(keys, list(CATEGORIES) + ["Avg", "Avg (en)", "Avg (zh)", "n"], lb_rows))
    if e_rows:
        parts.append("## LongBench-E: score (x100) by length bucket, mean over datasets\n\n"
                     + _md(keys, list(E_BUCKETS) + ["n"], e_rows))
    return "\n\n".join(parts) if parts else None
