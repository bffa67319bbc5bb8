"""Aggregation of rows into scores, the one implementation the run's ``metrics.json`` (``summarize``) and the
report (``score_table``, ``mean_over_tasks``) share: per task the mean per-sample score x 100 (as RULER and
LongBench report), the mean over tasks, and failed samples counted, never averaged in."""
from __future__ import annotations

SCORE_COLS = ["model", "method", "keep_ratio", "task"]
FULL_CACHE = "full"  # the method that evicts nothing: one reference, whatever keep ratios its rows carry
FULL_KEEP_RATIO = 1.0


def mark_failed(df):
    """``df`` with keep ratios rounded to 6 digits (one cell per ratio) and ``failed``: a row with an error or no
    score, counted in ``n_errors`` and never averaged in. ``score`` must already be numeric (or missing)."""
    df["keep_ratio"] = df["keep_ratio"].astype(float).round(6)
    df["failed"] = df["error"].notna() | df["score"].isna()
    return df


def full_once(df):
    """A copy of rows (or of a ``score_table``) where every row of the full cache has keep ratio 1.0. A sweep runs
    ``full`` at each of its ratios although it evicts nothing; the views (summary.md, cost.md, figures) show it
    once, as the reference at keep 1.0, averaging all its rows. ``summary.csv`` keeps the rows as run."""
    out = df.copy()
    out.loc[out["method"] == FULL_CACHE, "keep_ratio"] = FULL_KEEP_RATIO
    return out


def score_table(df, keys: list[str] = SCORE_COLS):
    """Long table: one row per ``keys`` (default model, method, keep_ratio, task) with score x100 (the mean over
    the group's rows that did not fail; NaN where all failed), n (rows averaged) and n_errors (rows failed)."""
    ok = df[~df["failed"]]
    scores = ok.groupby(keys)["score"].agg(["mean", "count"]).reset_index()
    scores["score"] = 100.0 * scores.pop("mean")
    scores = scores.rename(columns={"count": "n"})
    errors = df[df["failed"]].groupby(keys).size().rename("n_errors").reset_index()
    out = scores.merge(errors, on=keys, how="outer")
    out["n"] = out["n"].fillna(0).astype(int)
    out["n_errors"] = out["n_errors"].fillna(0).astype(int)
    return out.sort_values(keys).reset_index(drop=True)


def mean_over_tasks(table, index: list[str]):
    """Per ``index`` group of a ``score_table``, the mean of its tasks' scores (tasks without a score left out)."""
    return table.dropna(subset=["score"]).groupby(index)["score"].mean()


def summarize(rows: list[dict]) -> dict:
    """``{"<keep_ratio>": {"tasks": {task: score}, "mean": score, "n": n_ok, "n_errors": n_failed}}`` per method."""
    import pandas as pd

    if not rows:
        return {}
    df = pd.DataFrame(rows)
    for col in ("error", "score"):
        if col not in df:
            df[col] = None
    df["score"] = pd.to_numeric(df["score"])
    keys = ["method", "keep_ratio"]
    table = score_table(mark_failed(df), [*keys, "task"])
    means = mean_over_tasks(table, keys)
    out: dict = {}
    for (method, ratio), sub in table.groupby(keys, sort=True):
        scored = sub.dropna(subset=["score"])
        out.setdefault(method, {})[f"{ratio:g}"] = {
            "tasks": {str(t): float(s) for t, s in zip(scored["task"], scored["score"])},
            "mean": float(means[(method, ratio)]) if (method, ratio) in means.index else None,
            "n": int(sub["n"].sum()),
            "n_errors": int(sub["n_errors"].sum()),
        }
    return out
