"""LongBench v2's report section: result.py's table (overall, easy, hard, short, medium, long) per run setting.

Rows are those of the ``longbench_v2/<domain>`` tasks; failed rows are left out (pred.py writes no line for a
call that failed). A table row is one (model, method, keep ratio, prompt), and query mode when a report mixes
both: the accuracy of all its questions, whichever domains ran (n says how many questions).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from tasks.longbench.aggregate import _md
from tasks.longbench_v2.metrics import COLUMNS, aggregate, extract_answer

SUITE_PREFIX = "longbench_v2/"


def predictions(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """result.py's inputs from kvbench rows: difficulty and length from the row's meta, judge from its score."""
    out = []
    for row in rows:
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        out.append({"difficulty": meta.get("difficulty"), "length": meta.get("length"),
                    "judge": bool(row["score"]), "pred": extract_answer(str(row.get("prediction") or "").strip())})
    return out


def report_section(df) -> str | None:
    """Markdown: result.py's accuracy table per (model, method, keep_ratio, prompt[, query_aware])."""
    if df is None or "task" not in df or not len(df):
        return None
    sub = df[df["task"].astype(str).str.startswith(SUITE_PREFIX)]
    if "failed" in sub:
        sub = sub[~sub["failed"].astype(bool)]
    sub = sub[sub["score"].notna()] if "score" in sub else sub.iloc[0:0]
    if not len(sub):
        return None
    sub = sub.assign(prompt=[(m.get("prompt") if isinstance(m, dict) else None) or "0shot" for m in sub["meta"]])
    keys = [k for k in ("model", "method", "keep_ratio") if k in sub] + ["prompt"]
    if "query_aware" in sub and sub["query_aware"].astype(str).nunique() > 1:
        keys.append("query_aware")
    table = []
    for key, group in sub.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        records = group[["score", "meta", "prediction"]].to_dict("records")
        acc = aggregate(predictions(records))
        table.append((key, [acc[c] for c in COLUMNS] + [float(len(records))]))
    return ("## LongBench v2: accuracy (x100) as result.py reports it\n\n"
            "Overall, by difficulty (easy / hard) and by length (short / medium / long), rounded to one decimal; "
            "n = questions scored (– = no question of that kind).\n\n"
            + _md(keys, [c.capitalize() for c in COLUMNS] + ["n"], table))
