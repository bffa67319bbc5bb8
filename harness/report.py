"""``kvbench-report DIR``: every run below DIR merged into tables and plots.

Writes ``summary.csv`` (long format: model, method, keep_ratio, task, score, n, n_errors; every row as run, the
full cache at each keep ratio it was run at), ``summary.md`` (methods x keep ratio, per task and mean, mean
evidence retention where tasks mark their evidence, the score by question index where contexts carried several
questions, and the KV cache while decoding where rows carry ``kv_footprint``), ``cost.md`` (time and memory
relative to full cache, the time per question where contexts carried several, and decoding ms per token where rows
counted their tokens), ``score_vs_keep_ratio.{png,pdf}`` (mean over tasks), ``score_vs_keep_ratio_by_group.{png,pdf}``
(one panel per task group), ``score_vs_kv_bytes.{png,pdf}``, ``task_heatmap.{png,pdf}`` (method x task at the
smallest common keep ratio), and when present ``evidence_retention.csv`` / ``evidence_retention_by_layer.csv``,
needle-depth figures (``harness.depth_figures``), a head-budget heatmap, footprint figures
(``harness.footprint_figures``), suite tables (``tasks.report_hooks``) and, for runs made from a paper preset,
``published.{md,tex,csv}`` (ours beside the published numbers, ``harness.published``).

Rows are grouped by ``method_key``: the method, plus the decoding mode, target and interval of a run that
compressed while decoding (``snapkv [both 256/64]``), so it is its own line beside the prefill-only run. Failed
samples (``error`` set or no score) are counted in ``n_errors`` / ``n_failed`` and never averaged in, neither in
scores nor in evidence retention.

The full cache evicts nothing, so every view (summary.md, cost.md, the figures) shows it once, as keep 1.0, over
all its rows (``metrics.full_once``), whatever ratios of the sweep it was run at.

Duplicates: a run dir's ``predictions.jsonl`` counts each row key (task, sample_id, method, keep_ratio) once
(``harness.io.read_rows`` keeps the first row of a key written twice). Rows of different run dirs are different
runs and all count, even under the same key: a cell's ``n`` is the number of rows averaged, over every run dir
below DIR. So a run dir copied below DIR counts twice; point the report at a dir that holds each run once.

Every output is written atomically (``harness.io``; figures through ``harness.figures.save_figure``) with the
user's umask. Bad input is a one-line ``KvbenchError``: DIR missing or not a directory, no rows below it, a
corrupt ``predictions.jsonl`` or ``config.yaml``, an ``out`` that cannot be written.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from harness.errors import KvbenchError
from harness.io import atomic_write_text, os_error, read_rows
from harness.metrics import (FULL_CACHE, SCORE_COLS, full_once, mark_failed, mean_over_tasks,  # noqa: F401 (API)
                             score_table)


def load_rows(root: str | Path) -> pd.DataFrame:
    """Every row of every ``predictions.jsonl`` below ``root``, with its ``run_dir``, ``failed`` and ``paper``."""
    root = Path(root)
    if not root.exists():
        raise KvbenchError(f"report dir {str(root)!r} does not exist")
    if not root.is_dir():
        raise KvbenchError(f"report dir {str(root)!r} is not a directory; pass the results dir that holds the runs")
    rows = []
    try:
        paths = sorted(root.rglob("predictions.jsonl"))
    except OSError as err:
        raise KvbenchError(f"cannot read {str(root)!r}: {err.strerror or err}") from None
    for path in paths:
        file_rows, _ = read_rows(path)
        for r in file_rows:
            if r.get("model") is None:
                raise KvbenchError(f"{path}: the row of {r['task']} sample {r['sample_id']} has no model; fix or "
                                   "remove that line")
            problem = decoding_problem(r)
            if problem:
                raise KvbenchError(f"{path}: the row of {r['task']} sample {r['sample_id']} has {problem}; fix or "
                                   "remove that line")
            r["method"] = method_key(r)
            r["run_dir"] = str(path.parent)
        rows.extend(file_rows)
    if not rows:
        found = f"{len(paths)} predictions.jsonl without rows" if paths else "no predictions.jsonl"
        raise KvbenchError(f"{found} below {str(root)!r}; run kvbench first")
    df = pd.DataFrame(rows)
    for col in ("error", "score"):
        if col not in df:
            df[col] = None
    for col in ("score", *DECODE_NUMBERS):
        if col not in df:
            continue
        number = pd.to_numeric(df[col], errors="coerce")
        bad = df[col].notna() & number.isna()
        if bad.any():  # a string where a number belongs would otherwise be counted as a failed sample
            r = df[bad].iloc[0]
            raise KvbenchError(f"{r['run_dir']}/predictions.jsonl: the row of {r['task']} sample {r['sample_id']} "
                               f"has {col} {r[col]!r}, not a number; fix or remove that line")
        df[col] = number
    mark_failed(df)
    df["paper"] = df["run_dir"].map(_paper_names(df["run_dir"].unique()))
    return df


DECODING_MODES = ("prefill", "decode", "both")  # compressed once after the prefill / only while decoding / both
DECODE_NUMBERS = ("generated_tokens", "decode_ms_per_token", "kv_mean_entries", "kv_mean_bytes")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def method_key(row) -> str:
    """The name a row is reported under: its ``method``, and when it compressed while decoding (``decoding``
    ``decode`` or ``both``) the mode, target size (``ratio``: the keep ratio's share of the context) and interval,
    ``snapkv [both 256/64]``; so a decode-time run and a prefill-only run of one method are different lines. The
    full cache evicts nothing whatever its decoding: always ``full``, shown once."""
    method, mode = str(row["method"]), row.get("decoding")
    if method == FULL_CACHE or _missing(mode) or mode == "prefill":
        return method
    target, interval = row.get("decoding_target_size"), row.get("decoding_interval")
    size = "ratio" if _missing(target) else f"{int(target)}"
    return f"{method} [{mode} {size}" + ("" if _missing(interval) else f"/{int(interval)}") + "]"


def decoding_problem(row: dict) -> str | None:
    """What is wrong with a row's decode-time fields (None when absent or well formed)."""
    from harness.footprint_figures import check_footprint

    mode = row.get("decoding")
    if mode is not None and mode not in DECODING_MODES:
        return f"decoding {mode!r}, not one of {', '.join(DECODING_MODES)}"
    for name in ("decoding_target_size", "decoding_interval"):
        v = row.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            return f"{name} {v!r}, not a positive integer or null"
    problem = check_footprint(row.get("kv_footprint"))
    return f"a kv_footprint that cannot be read ({problem})" if problem else None


def _paper_names(run_dirs) -> dict[str, str | None]:
    """Run dir -> name of the paper preset it was made from (its config.yaml's paper.name), or None."""
    from harness.published import read_run_config

    out = {}
    for d in run_dirs:
        node = read_run_config(d).get("paper")
        out[d] = str(node["name"]) if isinstance(node, dict) and node.get("name") else None
    return out


def _fmt(x) -> str:
    return "–" if pd.isna(x) else f"{x:.1f}"


def markdown_table(frame: pd.DataFrame, index_names: list[str], formats: dict | None = None) -> str:
    """``frame`` as a markdown table; numbers as ``_fmt`` (one decimal) unless ``formats`` names a format
    (``"{:.3g}"``) for their column."""
    cols = [c for c in frame.columns]
    formats = formats or {}
    head = "| " + " | ".join(index_names + [str(c) for c in cols]) + " |"
    sep = "|" + "---|" * (len(index_names) + len(cols))
    lines = [head, sep]
    for idx, row in frame.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = [str(i) for i in idx]
        for col, v in zip(cols, row.tolist()):
            if isinstance(v, str):
                cells.append(v)
            elif col in formats and not pd.isna(v):
                cells.append(formats[col].format(v))
            else:
                cells.append(_fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_first(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows indexed by (method, ...) with the full cache's first: the reference the others are read against."""
    methods = frame.index.get_level_values(0)
    return pd.concat([frame[methods == FULL_CACHE], frame[methods != FULL_CACHE]])


def pivot_scores(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model: rows (method, keep_ratio), columns tasks + mean (mean over tasks with a score)."""
    out = {}
    for model, sub in table.groupby("model"):
        wide = sub.pivot_table(index=["method", "keep_ratio"], columns="task", values="score", aggfunc="mean")
        wide["mean"] = mean_over_tasks(sub, ["method", "keep_ratio"])  # as the run's metrics.json
        out[model] = wide
    return out


def evidence_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean evidence retention (fraction of the answer's evidence tokens kept, mean over layers) per (model,
    method, keep_ratio, task) and pooled over all rows of those tasks (task ``all``), for tasks whose rows carry
    ``evidence_retention``. Failed rows are excluded and counted in ``n_failed``."""
    cols = ["model", "method", "keep_ratio", "task", "evidence_retention", "n", "n_failed"]
    if "evidence_retention" not in df:
        return pd.DataFrame(columns=cols)
    marked = df[df["evidence_retention"].notna() & ~df["failed"]]
    if marked.empty:
        return pd.DataFrame(columns=cols)
    scope = df[df["task"].isin(set(marked["task"]))]
    keys = ["model", "method", "keep_ratio"]
    out = []
    for level in ("task", "all"):
        by = keys + (["task"] if level == "task" else [])
        ok = marked.groupby(by)["evidence_retention"].agg(["mean", "count"]).reset_index()
        failed = scope[scope["failed"]].groupby(by).size().rename("n_failed").reset_index()
        t = ok.merge(failed, on=by, how="outer")
        if level == "all":
            t["task"] = "all"
        out.append(t)
    t = pd.concat(out, ignore_index=True).rename(columns={"mean": "evidence_retention", "count": "n"})
    t["n"] = t["n"].fillna(0).astype(int)
    t["n_failed"] = t["n_failed"].fillna(0).astype(int)
    t["_all"] = t["task"] == "all"
    t = t.sort_values(keys + ["_all", "task"]).drop(columns="_all").reset_index(drop=True)
    return t[cols]


def evidence_by_layer(df: pd.DataFrame) -> pd.DataFrame:
    """Mean evidence retention per layer, per (model, method, keep_ratio), over the rows that carry it."""
    cols = ["model", "method", "keep_ratio", "layer", "evidence_retention", "n"]
    if "evidence_retention_by_layer" not in df:
        return pd.DataFrame(columns=cols)
    ok = df[~df["failed"] & df["evidence_retention_by_layer"].map(lambda v: isinstance(v, list) and len(v) > 0)]
    rows = []
    for (model, method, ratio), g in ok.groupby(["model", "method", "keep_ratio"]):
        lists = list(g["evidence_retention_by_layer"])
        for layer in range(max(len(v) for v in lists)):
            vals = [float(v[layer]) for v in lists if layer < len(v)]
            rows.append((model, method, ratio, layer, sum(vals) / len(vals), len(vals)))
    return pd.DataFrame(rows, columns=cols)


TIME_COLS = ("prefill_s", "compress_s", "decode_s")
SAMPLE_KEY = ["run_dir", "model", "method", "task", "sample_id"]


def charge_shared_prefill(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose keep ratio reused another ratio's prefill and scores (a method that scores once for every
    ratio records them at the first ratio only: prefill_s 0 at the others) charged that prefill, and its scoring
    through the first ratio's compress_s (which also holds that ratio's pruning, milliseconds): what serving at
    that one ratio costs. The rows of one sample share ``SAMPLE_KEY``."""
    if not {"prefill_s", "compress_s", *SAMPLE_KEY} <= set(df):
        return df
    out = df.copy()
    timed = out[~out["failed"] & out["prefill_s"].notna()]
    by_sample = timed.groupby(SAMPLE_KEY, dropna=False)["prefill_s"]
    shared = by_sample.transform("max")
    first = by_sample.transform("idxmax")  # the row that ran the prefill
    reused = timed.index[((timed["prefill_s"] == 0) & (shared > 0)).to_numpy()]
    out.loc[reused, "prefill_s"] = shared[reused]
    out.loc[reused, "compress_s"] = (out.loc[reused, "compress_s"].to_numpy()
                                     + out.loc[first[reused], "compress_s"].to_numpy())
    return out


def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Median time and memory per (model, method, keep_ratio) over the rows that did not fail (a shared prefill
    charged to every ratio, ``charge_shared_prefill``), and relative to the full cache where it ran. ``total_s`` =
    prefill + compress + decode of a row; ``time_per_question_s`` = (prefill + compress) / questions_per_context +
    decode (a context's prefill and compression are shared by its K questions; a row without K is one question);
    ``time_vs_full`` compares time per question; ``prefill_vs_full`` the time before decoding, prefill + compress
    (a method's scoring during its prefill is in compress_s); ``peak_vs_full`` the peak memory of a row."""
    ok = charge_shared_prefill(df[~df["failed"]])
    cols = [c for c in (*TIME_COLS, "kv_bytes", "peak_mem_bytes") if c in ok]
    if not cols:
        return pd.DataFrame()
    ok = ok.copy()
    for c in TIME_COLS:
        if c not in ok:
            ok[c] = float("nan")
    k = pd.to_numeric(ok["questions_per_context"], errors="coerce") if "questions_per_context" in ok else None
    k = k.fillna(1).clip(lower=1) if k is not None else 1
    ok["total_s"] = ok[list(TIME_COLS)].sum(axis=1)
    ok["before_decode_s"] = ok["prefill_s"].fillna(0) + ok["compress_s"].fillna(0)
    ok["time_per_question_s"] = ok["before_decode_s"] / k + ok["decode_s"].fillna(0)
    med = ok.groupby(["model", "method", "keep_ratio"])[cols + ["total_s", "time_per_question_s", "before_decode_s"]]
    med = med.median().reset_index()
    for c in (*TIME_COLS, "kv_bytes", "peak_mem_bytes"):  # a column no row recorded is shown empty
        if c not in med:
            med[c] = float("nan")
    compared = ["time_per_question_s", "kv_bytes", "before_decode_s", "peak_mem_bytes"]
    full = med[med["method"] == FULL_CACHE].groupby("model")[compared].median()

    def vs_full(col: str) -> pd.Series:
        return med[col] / (med["model"].map(full[col]) if len(full) else float("nan"))

    med["time_vs_full"], med["kv_vs_full"] = vs_full("time_per_question_s"), vs_full("kv_bytes")
    med["prefill_vs_full"], med["peak_vs_full"] = vs_full("before_decode_s"), vs_full("peak_mem_bytes")
    med["kv_mib"], med["peak_mib"] = med["kv_bytes"] / 2**20, med["peak_mem_bytes"] / 2**20
    ms = decode_ms_per_token(ok)
    if ms.notna().any():
        return med.merge(decode_speed(ok.assign(decode_ms_per_token=ms)), on=["model", "method", "keep_ratio"],
                         how="left")
    return med


def decode_ms_per_token(rows: pd.DataFrame) -> pd.Series:
    """A row's decoding time per generated token (ms): its ``decode_ms_per_token``, else ``decode_s`` over
    ``generated_tokens``; NaN for rows that recorded neither (runs before decode-time compression)."""
    n = _numbers(rows, "generated_tokens")
    return _numbers(rows, "decode_ms_per_token").fillna(_numbers(rows, "decode_s") * 1000 / n.where(n > 0))


def _numbers(rows: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(rows[col], errors="coerce") if col in rows else pd.Series(float("nan"), index=rows.index)


def decode_speed(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, keep_ratio): ``decode_ms_per_token``, the median over rows, and ``decode_vs_full``,
    the median over the (task, context length) cells it ran of its median ms/token there over the full cache's
    there: a compressed cache against the growing one on the same prompts, since a token's cost grows with the
    cache and so with the context (pooled medians would compare different task mixes)."""
    keys = ["model", "method", "keep_ratio"]
    rows = rows.dropna(subset=["decode_ms_per_token"])
    rows = rows.assign(_length=rows["context_length"].fillna(-1) if "context_length" in rows else -1)
    per_cell = rows.groupby([*keys, "task", "_length"])["decode_ms_per_token"].median().reset_index()
    full = per_cell[per_cell["method"] == FULL_CACHE].groupby(["model", "task", "_length"])["decode_ms_per_token"]
    per_cell = per_cell.merge(full.median().rename("_full").reset_index(), on=["model", "task", "_length"],
                              how="left")
    per_cell["decode_vs_full"] = per_cell["decode_ms_per_token"] / per_cell["_full"]
    speed = rows.groupby(keys)["decode_ms_per_token"].median()
    return pd.concat([speed, per_cell.groupby(keys)["decode_vs_full"].median()], axis=1).reset_index()


def footprint_table(df: pd.DataFrame) -> pd.DataFrame:
    """The KV cache while decoding per (model, method, keep_ratio), over the rows that carry ``kv_footprint``
    (``footprint_figures.footprint_rows``): n rows, generated (mean tokens generated), mean_entries (KV entries
    per head, mean over layers and heads, averaged over each row's generation and then over rows), max_entries
    (the largest head's cache at any point of any row: what memory must hold) and mean_mib (the cache's bytes,
    averaged likewise, MiB)."""
    from harness.footprint_figures import footprint_rows

    rows = footprint_rows(df)
    if rows.empty:
        return pd.DataFrame()
    t = rows.groupby(["model", "method", "keep_ratio"]).agg(
        n=("mean_entries", "size"), generated=("generated", "mean"), mean_entries=("mean_entries", "mean"),
        max_entries=("max_entries", "max"), mean_mib=("mean_bytes", "mean"))
    t["mean_mib"] = t["mean_mib"] / 2**20
    return t.reset_index()


def footprint_markdown(df: pd.DataFrame) -> list[str]:
    """A section per model of ``footprint_table``, the full cache (a growing cache) first; none unless some run
    compressed while decoding."""
    from harness.footprint_figures import compresses_while_decoding

    if not compresses_while_decoding(df):
        return []
    t = footprint_table(df)
    parts = []
    for model, sub in (t.groupby("model") if len(t) else []):
        shown = full_first(sub.drop(columns="model").set_index(["method", "keep_ratio"]))
        shown["n"] = shown["n"].astype(int).astype(str)
        parts.append(f"## {model}: KV cache while decoding\n\nKV entries per head (mean over layers and heads) over "
                     "the generation: mean_entries averages each row's footprint over the tokens it generated (it "
                     "grows a token at a time and drops at each compression while decoding), then over rows; "
                     "max_entries is the largest head's cache at any point of any row; mean_mib the cache's size "
                     "averaged likewise; generated the mean tokens generated (kv_footprint_*.png draws it).\n\n"
                     + markdown_table(shown, ["method", "keep_ratio"],
                                      {"max_entries": "{:.0f}", "mean_mib": "{:.3g}", "generated": "{:.0f}"}))
    return parts


def has_questions(df: pd.DataFrame) -> bool:
    """Whether some row's context carried several questions (``questions_per_context`` > 1)."""
    if "question_index" not in df or "questions_per_context" not in df:
        return False
    return bool((pd.to_numeric(df["questions_per_context"], errors="coerce") > 1).any())


def question_index_table(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model: rows (method, keep_ratio), columns question index 0..K-1, the score (x100) of the questions
    asked at that position about one compressed context, mean over tasks (each task's mean over its rows)."""
    qi = pd.to_numeric(df["question_index"], errors="coerce")
    rows = df[qi.notna()].assign(question_index=qi[qi.notna()].astype(int))
    table = score_table(rows, [*SCORE_COLS, "question_index"])
    out = {}
    for model, sub in table.groupby("model"):
        wide = (sub.dropna(subset=["score"]).groupby(["method", "keep_ratio", "question_index"])["score"].mean()
                .unstack("question_index"))
        wide.columns = [f"q{int(c)}" for c in wide.columns]
        out[model] = full_first(wide)
    return out


def write_report(root: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the report of the runs below ``root`` into ``out`` (default: ``root``); the paths written."""
    df = load_rows(root)
    out = Path(out or root)
    if out.exists() and not out.is_dir():
        raise KvbenchError(f"report output {str(out)!r} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise os_error(err, out) from None
    written = []

    p = out / "summary.csv"
    atomic_write_text(p, score_table(df).to_csv(index=False))  # data: every row as run
    written.append(p)

    view = full_once(df)  # what people read: the full cache once, at keep 1.0
    table = score_table(view)
    p = out / "summary.md"
    atomic_write_text(p, summary_markdown(root, out, df, view, table))
    written.append(p)

    evidence = evidence_table(df)
    if len(evidence):
        p = out / "evidence_retention.csv"
        atomic_write_text(p, evidence.round({"evidence_retention": 6}).to_csv(index=False, lineterminator="\n"))
        written.append(p)
        by_layer = evidence_by_layer(df)
        if len(by_layer):
            p = out / "evidence_retention_by_layer.csv"
            atomic_write_text(p, by_layer.round({"evidence_retention": 6}).to_csv(index=False, lineterminator="\n"))
            written.append(p)

    from harness.published import write_published

    written.extend(write_published(df, out))

    costs = cost_table(view)
    if len(costs):
        p = out / "cost.md"
        atomic_write_text(p, cost_markdown(costs, has_questions(df)))
        written.append(p)

    written.extend(_figures(view, table, out))
    return written


def summary_markdown(root, out: Path, df: pd.DataFrame, view: pd.DataFrame, table: pd.DataFrame) -> str:
    # the runs' dir relative to the report's (never a machine path): "." when the report sits beside them
    where = os.path.relpath(Path(root).resolve(), out.resolve())
    parts = [f"# kvbench report\n\nRuns below `{where}`: {len(df)} rows, {int(df['failed'].sum())} failed "
             "(failed samples are excluded from scores and counted here). The full cache evicts nothing: it is shown "
             "once, at keep ratio 1.0, over all its rows (summary.csv keeps every ratio it was run at).\n"]
    evidence = evidence_table(view)
    for model, wide in pivot_scores(table).items():
        ev = evidence[(evidence["model"] == model) & (evidence["task"] == "all")]
        if len(ev):
            ev = ev.set_index(["method", "keep_ratio"])["evidence_retention"] * 100
            wide = wide.copy()
            wide["evidence_retention (%)"] = [ev.get(k, float("nan")) for k in wide.index]
        parts.append(f"## {model}: score (x100) by method and keep ratio\n\n"
                     + markdown_table(full_first(wide), ["method", "keep_ratio"]))
    if len(evidence):
        n_failed = int(evidence.loc[evidence["task"] == "all", "n_failed"].sum())
        parts.append("Evidence retention: share of the answer's evidence tokens still in the cache after eviction "
                     "(mean over layers and KV heads), averaged over the rows of tasks that mark their evidence; "
                     f"{n_failed} failed rows of those tasks excluded (evidence_retention.csv).")
    if has_questions(view):
        for model, wide in question_index_table(view).items():
            parts.append(f"## {model}: score (x100) by question index\n\nContexts compressed once and asked K "
                         "questions (questions_per_context): column q<i> is the i-th question about the same "
                         "compressed context, mean over tasks.\n\n" + markdown_table(wide, ["method", "keep_ratio"]))
    parts.extend(footprint_markdown(view))
    errs = table[table["n_errors"] > 0]
    if len(errs):
        shown = errs.set_index(SCORE_COLS)[["n_errors"]].astype(int).astype(str)  # no tabulate needed
        parts.append("## Failed samples\n\n" + markdown_table(shown, SCORE_COLS))
    parts.extend(_suite_sections(view))
    return "\n\n".join(x for x in parts if x) + "\n"


def cost_markdown(costs: pd.DataFrame, questions: bool) -> str:
    cols = ["prefill_s", "compress_s", "decode_s", "total_s"] + (["time_per_question_s"] if questions else []) + [
        "time_vs_full", "prefill_vs_full", "kv_mib", "kv_vs_full", "peak_mib", "peak_vs_full"]
    speed = "decode_ms_per_token" in costs and costs["decode_ms_per_token"].notna().any()
    if speed:  # runs that counted their generated tokens (decode-time compression, issue #26)
        cols[cols.index("decode_s") + 1:cols.index("decode_s") + 1] = ["decode_ms_per_token"]
        cols[cols.index("prefill_vs_full") + 1:cols.index("prefill_vs_full") + 1] = ["decode_vs_full"]
    order = costs.assign(_evicts=costs["method"] != FULL_CACHE)  # per model the full cache first
    shown = order.sort_values(["model", "_evicts", "method", "keep_ratio"]).set_index(["model", "method", "keep_ratio"])
    shown = shown[cols]
    seconds = {c: "{:.3g}" for c in cols if c.endswith("_s")}
    text = ("# Cost: medians per sample\n\nSeconds per row (total_s = prefill_s + compress_s + decode_s); a keep "
            "ratio that reused another ratio's prefill and scores is charged them, as serving at that ratio alone "
            "would be. kv_mib: KV cache after eviction (MiB); peak_mib: peak memory of a row over what was held "
            "before it (MiB: CUDA's peak allocated on GPU, the largest RSS seen between phases on CPU); *_vs_full: "
            "relative to the full cache (keep 1.0); prefill_vs_full compares the time before decoding, prefill_s + "
            "compress_s (a method's scoring during its prefill is in compress_s).")
    if questions:
        text += (" time_per_question_s = (prefill_s + compress_s) / questions_per_context + decode_s: a context is "
                 "prefilled and compressed once for its K questions; time_vs_full compares it.")
    if speed:
        text += (" decode_ms_per_token: decode_s over the tokens generated (ms); decode_vs_full: that over the full "
                 "cache's on the same task and context length (a compressed cache against the growing one), the "
                 "median over those cells.")
    return (text + "\n\n" + markdown_table(shown, ["model", "method", "keep_ratio"],
                                            {**seconds, "time_vs_full": "{:.2f}", "prefill_vs_full": "{:.2f}",
                                             "decode_ms_per_token": "{:.3g}", "decode_vs_full": "{:.2f}",
                                             "kv_mib": "{:.3g}", "kv_vs_full": "{:.2f}", "peak_mib": "{:.3g}",
                                             "peak_vs_full": "{:.2f}"}) + "\n")


def _suite_sections(df: pd.DataFrame) -> list[str]:
    import tasks

    sections = []
    for hook in tasks.report_hooks():
        text = hook(df)
        if text:
            sections.append(text)
    return sections


def _figures(view: pd.DataFrame, table: pd.DataFrame, out: Path) -> list[Path]:
    """Every figure, from the rows with the full cache at keep 1.0 (``view``) and their score table."""
    from harness import depth_figures, figures, footprint_figures

    keys = ["model", "method", "keep_ratio"]
    means = mean_over_tasks(table, keys).reset_index()
    paths = figures.score_lines(means, "keep_ratio", out, "score_vs_keep_ratio", "keep ratio (share of the context "
                                "kept)")
    if "kv_bytes" in view:
        ok = view[~view["failed"]]
        size = (ok.groupby(keys)["kv_bytes"].median() / 2**20).rename("kv_mib").reset_index()
        by_size = means.merge(size, on=keys).dropna(subset=["kv_mib"])
        if len(by_size):
            paths += figures.score_lines(by_size, "kv_mib", out, "score_vs_kv_bytes",
                                         "KV cache after eviction (MiB, median per sample, log scale)", logx=True)
    paths.extend(figures.score_by_group(table, out))
    paths.extend(figures.task_heatmap(table, out))
    paths.extend(depth_figures.niah_figures(view, out))
    paths.extend(figures.budget_heatmap(view, out))
    paths.extend(footprint_figures.footprint_figures(view, out))
    return paths
