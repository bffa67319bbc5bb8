"""Figures drawn by the report when the runs hold what they need, each as PNG and PDF: score vs keep ratio per
task group, a method x task heatmap, NIAH depth x length and head-budget heatmaps. Every file is written
atomically (``save_figure``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.io import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, stem: str, **savefig_kw) -> list[Path]:
    """``<stem>.png`` and ``<stem>.pdf`` in ``out``, each drawn into a temporary file and renamed into place
    (``atomic_path``): a report killed mid-draw leaves the previous figure, never a 0-byte or torn one. The
    figure is closed even when a save fails."""
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    try:
        for p in paths:
            with atomic_path(p) as tmp:
                fig.savefig(tmp, format=p.suffix[1:], **savefig_kw)  # the format of the final name, not the temp's
    finally:
        pyplot().close(fig)
    return paths


def _save(fig, out: Path, stem: str) -> list[Path]:
    return save_figure(fig, out, stem, dpi=120, bbox_inches="tight")  # rotated tick labels stay inside


def task_group(task: str) -> str:
    """The panel a task is drawn in: RULER NIAH, RULER other, LongBench <category> (the README category the
    longbench task module declares, ``tasks.longbench.category_of``), else its prefix."""
    suite, _, name = task.partition("/")
    if suite == "ruler":
        return "RULER NIAH" if name.startswith("niah") else "RULER other"
    if suite.startswith("longbench"):
        from tasks.longbench import category_of

        cat = category_of(name)
        return f"LongBench {cat}" if cat else "LongBench other"
    return suite if name else task


def score_by_group(table: pd.DataFrame, out: Path) -> list[Path]:
    """Score vs keep ratio per method, one panel per task group (columns) and model (rows). ``table`` is
    ``report.score_table``'s (failed samples already excluded); a group's score is the mean over its tasks."""
    t = table.dropna(subset=["score"]).copy()
    if t.empty:
        return []
    t["group"] = t["task"].map(task_group)
    models = sorted(t["model"].unique())
    groups = sorted(t["group"].unique())
    plt = pyplot()
    style = method_styles(sorted(t["method"].unique()))
    fig, axes = plt.subplots(len(models), len(groups), figsize=(4.2 * len(groups), 3.6 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        for j, group in enumerate(groups):
            ax = axes[i][j]
            sub = t[(t["model"] == model) & (t["group"] == group)]
            n_tasks = sub["task"].nunique()
            for method, g in sub.groupby("method"):
                g = g.groupby("keep_ratio")["score"].mean().sort_index()
                ax.plot(g.index, g.values, label=method, **style[method])
            ax.set_title(f"{model}: {group} ({n_tasks} task{'s' if n_tasks != 1 else ''})", fontsize=9)
            ax.set_xlabel("keep ratio")
            ax.set_ylabel("score")
            ax.grid(alpha=0.3)
            if len(sub):
                ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "score_vs_keep_ratio_by_group")


def method_styles(methods: list[str]) -> dict[str, dict]:
    """A distinct colour + marker + line style per method (more than 10 methods: tab10 alone repeats)."""
    plt = pyplot()
    colors = plt.cm.tab20.colors
    markers = "osD^v<>pX*"
    return {m: {"color": colors[i % 20], "marker": markers[i % len(markers)],
                "linestyle": "-" if "+" not in m else "--"} for i, m in enumerate(methods)}


def common_keep_ratio(table: pd.DataFrame) -> float | None:
    """The smallest keep ratio every evicting method (all but ``full``) ran; if none is shared, the smallest
    ratio run by the most methods."""
    t = table[table["method"] != "full"]
    if t.empty:
        t = table
    if t.empty:
        return None
    per_ratio = t.groupby("keep_ratio")["method"].nunique()
    shared = per_ratio[per_ratio == t["method"].nunique()]
    if len(shared):
        return float(shared.index.min())
    best = per_ratio[per_ratio == per_ratio.max()]
    return float(best.index.min())


def task_heatmap(table: pd.DataFrame, out: Path) -> list[Path]:
    """Score per method x task at the smallest common keep ratio, one panel per model; ``full`` (any ratio, it
    evicts nothing) is drawn as a reference row."""
    t = table.dropna(subset=["score"])
    ratio = common_keep_ratio(t)
    if ratio is None:
        return []
    at = t[((t["keep_ratio"] - ratio).abs() < 1e-6) & (t["method"] != "full")]
    full = t[t["method"] == "full"]
    if at.empty or at["task"].nunique() < 1:
        return []
    models = sorted(set(at["model"]))
    plt = pyplot()
    n_tasks = at["task"].nunique()
    fig, axes = plt.subplots(1, len(models), figsize=(max(4.0, 0.55 * n_tasks + 2.5) * len(models),
                                                      0.45 * (at["method"].nunique() + 1) + 2.5), squeeze=False)
    im = None
    for ax, model in zip(axes[0], models):
        grid = at[at["model"] == model].pivot_table(index="method", columns="task", values="score", aggfunc="mean")
        f = full[full["model"] == model]
        if len(f):
            grid.loc["full"] = f.groupby("task")["score"].mean().reindex(grid.columns)
        im = _score_image(ax, grid)
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(grid.shape[0]), [str(m) for m in grid.index], fontsize=8)
        for (y, x), v in np.ndenumerate(grid.values):
            if not np.isnan(v):
                ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{model} @ keep ratio {ratio:g}", fontsize=9)
    _score_colorbar(fig, axes, im)
    return _save(fig, out, "task_heatmap")


def _score_image(ax, grid: pd.DataFrame):
    """A grid of scores (x100) drawn on ``ax`` on the scale every score heatmap shares (0-100, red to green)."""
    return ax.imshow(grid.values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")


def _score_colorbar(fig, axes, im) -> None:
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score")


def niah_heatmap(df: pd.DataFrame, out: Path) -> list[Path]:
    """Score by needle depth x context length, one panel per (method, keep ratio), for ruler/niah_* tasks."""
    if "meta" not in df:
        return []
    sub = df[df["task"].str.startswith("ruler/niah") & ~df["failed"]].copy()
    sub["depth"] = sub["meta"].map(lambda m: m.get("depth") if isinstance(m, dict) else None)
    sub = sub.dropna(subset=["depth"])
    if sub.empty or sub["depth"].nunique() < 2:
        return []
    plt = pyplot()
    groups = list(sub.groupby(["method", "keep_ratio"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, ((method, ratio), g) in zip(axes[0], groups):
        grid = g.pivot_table(index="depth", columns="context_length", values="score", aggfunc="mean") * 100
        im = _score_image(ax, grid)
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], rotation=45)
        ax.set_yticks(range(grid.shape[0]), [f"{d:g}" for d in grid.index])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth (%)")
        ax.set_title(f"{method} @ {ratio:g}", fontsize=9)
    _score_colorbar(fig, axes, im)
    return _save(fig, out, "niah_heatmap")


def budget_heatmap(df: pd.DataFrame, out: Path) -> list[Path]:
    """Mean share of the context each (layer, KV head) kept, for runs whose heads got different budgets."""
    if "budgets" not in df:
        return []
    ok = df[~df["failed"] & df["budgets"].map(lambda b: isinstance(b, list) and len(b) > 0)]
    if "model" not in ok:
        ok = ok.assign(model="")
    several_models = ok["model"].nunique() > 1
    panels = []
    # one panel per model too: models of other shapes (layers x KV heads) cannot share a mean
    for (model, method, ratio), g in ok.groupby(["model", "method", "keep_ratio"]):
        shares = [np.asarray(b, dtype=float) / max(1, n) for b, n in zip(g["budgets"], g["context_tokens"])]
        if len({a.shape for a in shares}) > 1:
            continue  # one model name over runs of different shapes: no mean to show
        mean = np.mean(np.stack(shares), axis=0)
        if np.ptp(mean) > 1e-9:  # uniform budgets say nothing
            panels.append((f"{model}: {method}" if several_models else method, ratio, mean))
    if not panels:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 4), squeeze=False)
    for ax, (name, ratio, mean) in zip(axes[0], panels):
        im = ax.imshow(mean, cmap="viridis", aspect="auto", vmin=0)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_title(f"{name} @ {ratio:g}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label="kept share")
    return _save(fig, out, "budget_heatmap")
