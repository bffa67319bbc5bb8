"""``kvbench-report DIR``: every run below DIR merged into tables and plots.

Writes ``summary.csv`` (long format: model, method, keep_ratio, task, score, n, n_errors), ``summary.md``
(methods x keep ratio, per task and mean, and mean evidence retention where tasks mark their evidence),
``cost.md`` (time and memory relative to full cache), ``score_vs_keep_ratio.{png,pdf}`` (mean over tasks) and
``score_vs_keep_ratio_by_group.{png,pdf}`` (one panel per task group), ``score_vs_kv_bytes.{png,pdf}``,
``task_heatmap.{png,pdf}`` (method x task at the smallest common keep ratio), and when present
``evidence_retention.csv`` / ``evidence_retention_by_layer.csv``, NIAH depth x length and head-budget heatmaps,
suite tables (``tasks.report_hooks``) and, for runs made from a paper preset, ``published.{md,tex,csv}`` (ours
beside the published numbers, ``harness.published``). Failed samples (``error`` set or no score) are counted
in ``n_errors`` / ``n_failed`` and never averaged in, neither in scores nor in evidence retention.

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
from harness.metrics import SCORE_COLS, mark_failed, mean_over_tasks, score_table  # noqa: F401 (report API)


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
            r["run_dir"] = str(path.parent)
        rows.extend(file_rows)
    if not rows:
        found = f"{len(paths)} predictions.jsonl without rows" if paths else "no predictions.jsonl"
        raise KvbenchError(f"{found} below {str(root)!r}; run kvbench first")
    df = pd.DataFrame(rows)
    for col in ("error", "score"):
        if col not in df:
            df[col] = None
    score = pd.to_numeric(df["score"], errors="coerce")
    bad = df["score"].notna() & score.isna()
    if bad.any():  # a string where a number belongs would otherwise be counted as a failed sample
        r = df[bad].iloc[0]
        raise KvbenchError(f"{r['run_dir']}/predictions.jsonl: the row of {r['task']} sample {r['sample_id']} has "
                           f"score {r['score']!r}, not a number; fix or remove that line")
    df["score"] = score
    mark_failed(df)
    df["paper"] = df["run_dir"].map(_paper_names(df["run_dir"].unique()))
    return df


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


def markdown_table(frame: pd.DataFrame, index_names: list[str]) -> str:
    cols = [c for c in frame.columns]
    head = "| " + " | ".join(index_names + [str(c) for c in cols]) + " |"
    sep = "|" + "---|" * (len(index_names) + len(cols))
    lines = [head, sep]
    for idx, row in frame.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = [str(i) for i in idx] + [_fmt(v) if not isinstance(v, str) else v for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Median time and memory per (model, method, keep_ratio), and relative to full cache where it ran."""
    ok = df[~df["failed"]].copy()
    cols = [c for c in ("prefill_s", "compress_s", "decode_s", "kv_bytes", "peak_mem_bytes") if c in ok]
    if not cols:
        return pd.DataFrame()
    ok["total_s"] = ok[["prefill_s", "compress_s", "decode_s"]].sum(axis=1)
    med = ok.groupby(["model", "method", "keep_ratio"])[cols + ["total_s"]].median().reset_index()
    full = med[med["method"] == "full"].groupby("model")[["total_s", "kv_bytes"]].median()
    med["time_vs_full"] = med.apply(
        lambda r: r["total_s"] / full.loc[r["model"], "total_s"] if r["model"] in full.index else float("nan"), axis=1)
    med["kv_vs_full"] = med.apply(
        lambda r: r["kv_bytes"] / full.loc[r["model"], "kv_bytes"] if r["model"] in full.index else float("nan"), axis=1)
    return med


def _plot_lines(table: pd.DataFrame, x: str, out: Path, stem: str, xlabel: str, logx: bool = False) -> list[Path]:
    from harness.figures import pyplot, save_figure

    plt = pyplot()
    models = sorted(table["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = table[table["model"] == model]
        for method, g in sub.groupby("method"):
            g = g.groupby(x)["score"].mean().sort_index()
            ax.plot(g.index, g.values, marker="o", label=method)
        ax.set_title(model)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score (mean over tasks)")
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, stem, dpi=120)


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
    table = score_table(df)
    written = []

    p = out / "summary.csv"
    atomic_write_text(p, table.to_csv(index=False))
    written.append(p)

    # the runs' dir relative to the report's (never a machine path): "." when the report sits beside them
    where = os.path.relpath(Path(root).resolve(), out.resolve())
    parts = [f"# kvbench report\n\nRuns below `{where}`: {len(df)} rows, {int(df['failed'].sum())} failed "
             "(failed samples are excluded from scores and counted here).\n"]
    evidence = evidence_table(df)
    for model, wide in pivot_scores(table).items():
        ev = evidence[(evidence["model"] == model) & (evidence["task"] == "all")]
        if len(ev):
            ev = ev.set_index(["method", "keep_ratio"])["evidence_retention"] * 100
            wide = wide.copy()
            wide["evidence_retention (%)"] = [ev.get(k, float("nan")) for k in wide.index]
        parts.append(f"## {model}: score (x100) by method and keep ratio\n\n" + markdown_table(wide, ["method", "keep_ratio"]))
    if len(evidence):
        n_failed = int(evidence.loc[evidence["task"] == "all", "n_failed"].sum())
        parts.append("Evidence retention: share of the answer's evidence tokens still in the cache after eviction "
                     "(mean over layers and KV heads), averaged over the rows of tasks that mark their evidence; "
                     f"{n_failed} failed rows of those tasks excluded (evidence_retention.csv).")
    errs = table[table["n_errors"] > 0]
    if len(errs):
        shown = errs.set_index(SCORE_COLS)[["n_errors"]].astype(int).astype(str)  # no tabulate needed
        parts.append("## Failed samples\n\n" + markdown_table(shown, SCORE_COLS))
    parts.extend(_suite_sections(df))
    p = out / "summary.md"
    atomic_write_text(p, "\n\n".join(x for x in parts if x) + "\n")
    written.append(p)

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

    costs = cost_table(df)
    if len(costs):
        shown = costs.set_index(["model", "method", "keep_ratio"])[
            ["prefill_s", "compress_s", "decode_s", "time_vs_full", "kv_vs_full"]]
        p = out / "cost.md"
        atomic_write_text(p, "# Cost: medians per sample\n\n" + markdown_table(shown.round(4), ["model", "method", "keep_ratio"]) + "\n")
        written.append(p)

    mean_by_ratio = table.groupby(["model", "method", "keep_ratio"])["score"].mean().reset_index()
    written += _plot_lines(mean_by_ratio, "keep_ratio", out, "score_vs_keep_ratio", "keep ratio")

    if "kv_bytes" in df:
        ok = df[~df["failed"]]
        by_bytes = ok.groupby(["model", "method", "keep_ratio"]).agg(kv_bytes=("kv_bytes", "median"),
                                                                     score=("score", "mean")).reset_index()
        by_bytes["score"] *= 100
        written += _plot_lines(by_bytes, "kv_bytes", out, "score_vs_kv_bytes", "KV cache bytes (median per sample)",
                               logx=True)

    written.extend(_figures(df, out))
    return written


def _suite_sections(df: pd.DataFrame) -> list[str]:
    import tasks

    sections = []
    for hook in tasks.report_hooks():
        text = hook(df)
        if text:
            sections.append(text)
    return sections


def _figures(df: pd.DataFrame, out: Path) -> list[Path]:
    from harness import figures

    paths = []
    table = score_table(df)
    paths.extend(figures.score_by_group(table, out))
    paths.extend(figures.task_heatmap(table, out))
    for fn in (figures.niah_heatmap, figures.budget_heatmap):
        paths.extend(fn(df, out))
    return paths
