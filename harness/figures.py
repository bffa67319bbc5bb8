"""Figures drawn by the report, each as PNG and PDF: score vs keep ratio and vs KV-cache size (mean over tasks, and
per task group), a method x task heatmap and a head-budget heatmap; NIAH depth figures are in
``harness.depth_figures``. Each ``draw_*`` function returns the matplotlib figure (the tests read its layout); the
function of the same name without ``draw_`` writes it, atomically (``save_figure``).

Conventions every figure keeps: the full cache is drawn once, as the reference at keep 1.0 (a dashed black line
in line charts, its own row or panel in heatmaps), never as a method at each ratio of the sweep; scores are on
0-100 (the report's x100) with one shared scale; a figure has one legend, outside its panels, and one colorbar.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.io import atomic_path
from harness.metrics import FULL_CACHE

SCORE_LABEL = "score (0-100)"
FULL_LABEL = "full cache (keep 1.0)"
FULL_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.3}
SCORE_CMAP = "niah_red_green"
SCORE_LIMITS = (-4, 104)  # 0 and 100 stay visible above and below the markers


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
    return save_figure(fig, out, stem, dpi=120, bbox_inches="tight")  # labels outside the axes stay inside


def score_cmap():
    """Red (0) - amber - green (100), the scale of the needle-in-a-haystack heatmaps people know: the colours of
    gkamradt/LLMTest_NeedleInAHaystack viz/CreateVizFromLLMTesting.ipynb (commit 7b90d285651b68d39a94f3d3bd3672f8
    4192c989, ``LinearSegmentedColormap.from_list(..., ["#F0496E", "#EBB839", "#0CD79F"])``). Cells not run are
    light grey."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list(SCORE_CMAP, ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="#dddddd")


def score_image(ax, values: np.ndarray):
    """A grid of scores (0-100) on ``ax`` on the scale every score heatmap shares."""
    return ax.imshow(values, vmin=0, vmax=100, cmap=score_cmap(), aspect="auto", interpolation="nearest")


def annotate(ax, values: np.ndarray, fontsize: float = 7) -> None:
    for (y, x), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=fontsize, color="#222222")


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


def method_styles(methods) -> dict[str, dict]:
    """A distinct colour + marker + line style per evicting method (more than 10: tab10 alone repeats); the full
    cache has ``FULL_STYLE``. Line styles: solid, dashed with an allocator (``snapkv+adakv``), dash-dot when it
    compressed while decoding (``snapkv [both 256/64]``, ``report.method_key``)."""
    plt = pyplot()
    colors = plt.cm.tab10.colors + plt.cm.Dark2.colors
    markers = "osD^v<>pX*"
    evicting = sorted(m for m in set(methods) if m != FULL_CACHE)
    return {m: {"color": colors[i % len(colors)], "marker": markers[i % len(markers)],
                "linestyle": "-." if " [" in m else "--" if "+" in m else "-"} for i, m in enumerate(evicting)}


def panel_grid(n: int, max_cols: int, panel_w: float, panel_h: float, extra_w: float = 0.0, **kw):
    """A constrained-layout figure of ``n`` panels wrapped into rows of at most ``max_cols``; unused cells hidden.
    Returns the figure and the ``n`` axes in reading order."""
    n_cols = max(1, min(n, max_cols))
    n_rows = max(1, math.ceil(n / n_cols))
    fig = pyplot().figure(figsize=(panel_w * n_cols + extra_w, panel_h * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, **kw)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _legend(fig, axes) -> None:
    """One legend for the figure, right of its panels (never over a line or the title), each label once."""
    seen = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    if seen:
        labels = sorted(seen, key=lambda s: (s != FULL_LABEL, s))
        fig.legend([seen[k] for k in labels], labels, loc="outside right center", fontsize=8, frameon=False)  # centred: clear of the title


def _score_axis(ax) -> None:
    ax.set_ylim(*SCORE_LIMITS)
    ax.grid(alpha=0.3)


def _method_lines(ax, sub: pd.DataFrame, x: str, style: dict, full_at_x: bool = False) -> None:
    """One line per evicting method (mean score at each ``x``) and the full cache's reference line (its mean),
    with a point at its own ``x`` when ``full_at_x`` (the KV-size axis, where full has a size)."""
    for method, g in sub[sub["method"] != FULL_CACHE].groupby("method"):
        g = g.groupby(x)["score"].mean().sort_index()
        ax.plot(g.index, g.values, label=method, markersize=5, **style[method])
    full = sub[sub["method"] == FULL_CACHE].dropna(subset=["score"])
    if len(full):
        ax.axhline(full["score"].mean(), label=FULL_LABEL, **FULL_STYLE)
        if full_at_x:
            ax.plot(full[x].median(), full["score"].mean(), marker="*", markersize=11, color="black",
                    linestyle="none")


def _ratio_ticks(ax, ratios) -> None:
    ratios = sorted({float(r) for r in ratios})
    if 0 < len(ratios) <= 8:
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])


def log_axis(ax, which: str = "x") -> None:
    """A log scale on ``ax``'s ``which`` axis ("x" or "y") labelled 1, 2, 5 a decade in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())  # minor labels overlapped ("3x10^6 4x10^6")


def draw_score_lines(table: pd.DataFrame, x: str, xlabel: str, logx: bool = False):
    """Score vs ``x`` (keep_ratio or kv_mib) per method, one panel per model; ``table`` holds model, method, ``x``
    and score (mean over tasks, full at keep 1.0: ``metrics.full_once``)."""
    models = sorted(table["model"].unique())
    style = method_styles(table["method"])
    fig, axes = panel_grid(len(models), 3, 5.0, 3.8, extra_w=1.8, sharey=True)
    for ax, model in zip(axes, models):
        sub = table[table["model"] == model]
        _method_lines(ax, sub, x, style, full_at_x=(x != "keep_ratio"))
        ax.set_title(model, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{SCORE_LABEL}, mean over tasks")
        _score_axis(ax)
        if logx:
            log_axis(ax)
        else:
            _ratio_ticks(ax, sub.loc[sub["method"] != FULL_CACHE, x])
    _legend(fig, axes)
    return fig


def score_lines(table: pd.DataFrame, x: str, out: Path, stem: str, xlabel: str, logx: bool = False) -> list[Path]:
    if table.dropna(subset=["score"]).empty:
        return []
    return _save(draw_score_lines(table.dropna(subset=["score"]), x, xlabel, logx), out, stem)


def draw_score_by_group(table: pd.DataFrame):
    """Score vs keep ratio per method, one panel per (model, task group), at most 4 panels a row. ``table`` is a
    ``score_table`` with full at keep 1.0 (``metrics.full_once``); a group's score is the mean over its tasks."""
    t = table.dropna(subset=["score"]).copy()
    t["group"] = t["task"].map(task_group)
    panels = sorted(t.groupby(["model", "group"]).groups)
    several_models = t["model"].nunique() > 1
    style = method_styles(t["method"])
    fig, axes = panel_grid(len(panels), 4, 4.0, 3.3, extra_w=1.8, sharey=True)
    for ax, (model, group) in zip(axes, panels):
        sub = t[(t["model"] == model) & (t["group"] == group)]
        n_tasks = sub["task"].nunique()
        per_ratio = sub.groupby(["method", "keep_ratio"], as_index=False)["score"].mean()
        _method_lines(ax, per_ratio, "keep_ratio", style)
        name = f"{model}: {group}" if several_models else group
        ax.set_title(f"{name} ({n_tasks} task{'s' if n_tasks != 1 else ''})", fontsize=9)
        ax.set_xlabel("keep ratio")
        ax.set_ylabel(SCORE_LABEL)
        _score_axis(ax)
        _ratio_ticks(ax, per_ratio.loc[per_ratio["method"] != FULL_CACHE, "keep_ratio"])
    if not several_models:
        fig.suptitle(f"{panels[0][0]}: score vs keep ratio by task group", fontsize=10)
    _legend(fig, axes)
    return fig


def score_by_group(table: pd.DataFrame, out: Path) -> list[Path]:
    if table.dropna(subset=["score"]).empty:
        return []
    return _save(draw_score_by_group(table), out, "score_vs_keep_ratio_by_group")


def common_keep_ratio(table: pd.DataFrame) -> float | None:
    """The smallest keep ratio every evicting method (all but ``full``) ran; if none is shared, the smallest
    ratio run by the most methods."""
    t = table[table["method"] != FULL_CACHE]
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


def draw_task_heatmap(table: pd.DataFrame):
    """Score per method x task at the smallest common keep ratio, one panel per model, the full cache as the top
    row (the reference, separated by a line); None when there is nothing to draw."""
    t = table.dropna(subset=["score"])
    ratio = common_keep_ratio(t)
    if ratio is None:
        return None
    at = t[((t["keep_ratio"] - ratio).abs() < 1e-6) & (t["method"] != FULL_CACHE)]
    full = t[t["method"] == FULL_CACHE]
    if at.empty:
        return None
    models = sorted(set(at["model"]))
    n_tasks = at["task"].nunique()
    n_rows = at["method"].nunique() + 1
    fig, axes = panel_grid(len(models), 2, max(3.0, 0.6 * n_tasks + 1.8), 0.42 * n_rows + 2.2, extra_w=0.8)
    im = None
    for ax, model in zip(axes, models):
        grid = at[at["model"] == model].pivot_table(index="method", columns="task", values="score", aggfunc="mean")
        f = full[full["model"] == model]
        if len(f):
            ref = f.groupby("task")["score"].mean().reindex(grid.columns).to_frame(FULL_LABEL).T
            grid = pd.concat([ref, grid])
        im = score_image(ax, grid.values)
        annotate(ax, grid.values, fontsize=8)
        if len(f):
            ax.axhline(0.5, color="white", linewidth=3)
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(grid.shape[0]), [str(m) for m in grid.index], fontsize=8)
        ax.set_title(f"{model}: score at keep ratio {ratio:g}" + (" (full at 1.0)" if len(f) else ""), fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label=SCORE_LABEL)
    return fig


def task_heatmap(table: pd.DataFrame, out: Path) -> list[Path]:
    fig = draw_task_heatmap(table)
    return [] if fig is None else _save(fig, out, "task_heatmap")


def draw_budget_heatmap(df: pd.DataFrame):
    """Mean share of the context each (layer, KV head) kept, for runs whose heads got different budgets, one
    panel per (model, method, keep ratio), at most 4 a row, one colour scale; None when no run has such budgets."""
    if "budgets" not in df:
        return None
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
        return None
    top = max(float(mean.max()) for _, _, mean in panels)
    fig, axes = panel_grid(len(panels), 4, 3.0, 3.2, extra_w=0.8)
    im = None
    for ax, (name, ratio, mean) in zip(axes, panels):
        im = ax.imshow(mean, cmap="viridis", aspect="auto", vmin=0, vmax=top, interpolation="nearest")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        _integer_ticks(ax, *mean.shape)
        ax.set_title(f"{name} @ keep {ratio:g}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of the context kept")
    return fig


def _integer_ticks(ax, n_rows: int, n_cols: int) -> None:
    step = lambda n: max(1, math.ceil(n / 12))  # noqa: E731 (at most ~12 labels an axis)
    ax.set_yticks(range(0, n_rows, step(n_rows)))
    ax.set_xticks(range(0, n_cols, step(n_cols)))


def budget_heatmap(df: pd.DataFrame, out: Path) -> list[Path]:
    fig = draw_budget_heatmap(df)
    return [] if fig is None else _save(fig, out, "budget_heatmap")
