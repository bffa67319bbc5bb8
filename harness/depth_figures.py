"""Needle-depth figures: score by needle depth for every task whose rows carry ``meta["depth"]`` (percent), one
figure per model and task group (``figures.task_group``: RULER's niah tasks together, any other suite by its
prefix), the group's score at a cell the mean over its tasks.

- Several context lengths (a row's ``context_length`` is its cell's length): ``niah_heatmap_<group>``, the NIAH
  heatmap (depth down, context length across) on a grid of panels, a row per evicting method and a column per
  keep ratio, with the full cache once above them as the reference panel (keep 1.0); one colour scale.
- One context length: ``niah_depth_<group>``, score vs depth, a panel per keep ratio with the methods side by side
  and the full cache as the dashed reference line in each (a one-column heatmap per method says little).

Depths are drawn as run when they form a grid (``task.depth=`` sweeps, a length x depth task), else rounded to the
nearest 10 % (RULER draws each sample's depth at random; a line has at most 11 points): ``depth_axis``."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from harness.figures import (FULL_LABEL, FULL_STYLE, SCORE_LABEL, _legend, _save, _score_axis, annotate,
                             method_styles, panel_grid, pyplot, score_image, task_group)
from harness.metrics import FULL_CACHE, FULL_KEEP_RATIO

MAX_HEATMAP_DEPTHS = 41  # rows of a depth x length heatmap: RULER's 40-point grid, gkamradt's 35
MAX_LINE_DEPTHS = 11  # points of a score vs depth line: 0, 10, ..., 100
DEPTH_BIN = 10  # percent


def depth_rows(df: pd.DataFrame) -> pd.DataFrame:
    """model, method, keep_ratio, task, group, context_length, depth (percent) and score (x100) of the rows that
    did not fail and carry a numeric ``meta["depth"]``; ``full``'s rows at keep 1.0."""
    cols = ["model", "method", "keep_ratio", "task", "group", "context_length", "depth", "score"]
    if "meta" not in df or "context_length" not in df:
        return pd.DataFrame(columns=cols)
    depth = df["meta"].map(lambda m: m.get("depth") if isinstance(m, dict) else None)
    depth = pd.to_numeric(depth.map(lambda d: d if isinstance(d, (int, float)) and not isinstance(d, bool)
                                    else None), errors="coerce")
    keep = ~df["failed"] & depth.notna() & df["context_length"].notna()
    t = df.loc[keep, ["model", "method", "keep_ratio", "task", "context_length", "score"]].copy()
    t["depth"] = depth[keep].astype(float)
    t["context_length"] = t["context_length"].astype(int)
    t["score"] = t["score"] * 100
    t["group"] = t["task"].map(task_group)
    t.loc[t["method"] == FULL_CACHE, "keep_ratio"] = FULL_KEEP_RATIO
    return t[cols]


def depth_axis(t: pd.DataFrame, max_values: int) -> tuple[pd.Series, bool]:
    """Each row's depth on the figure, and whether it was rounded. Depths stay as run when they form a grid:
    each depth shared by several rows of a method and ratio (``task.depth=`` sweeps, a length x depth task, many
    samples of RULER's 40-point grid) and at most ``max_values`` of them. Depths drawn per sample (RULER's, a few
    samples) are rounded to the nearest ``DEPTH_BIN`` %, so that a point is a mean over samples, not one sample."""
    depths = t["depth"]
    evicting = t[t["method"] != FULL_CACHE]  # the full cache's rows of every ratio of a sweep count once
    per_depth = (evicting if len(evicting) else t).groupby(["method", "keep_ratio", "depth"]).size()
    if depths.nunique() <= max_values and per_depth.median() >= 2:
        return depths, False
    rounded = np.floor(depths / DEPTH_BIN + 0.5) * DEPTH_BIN
    return rounded, bool((rounded != depths).any())


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def cell_scores(t: pd.DataFrame, by: list[str]) -> pd.Series:
    """Mean score per ``by`` cell: the mean over tasks of each task's mean (as the summary's mean over tasks)."""
    return t.groupby(by + ["task"])["score"].mean().groupby(level=by).mean()


def draw_depth_figures(df: pd.DataFrame) -> list[tuple[str, object]]:
    """(file stem, figure) per model and task group with at least two depths or two context lengths."""
    rows = depth_rows(df)
    if rows.empty:
        return []
    style = method_styles(rows["method"])
    several_models = rows["model"].nunique() > 1
    figures = []
    for (model, group), t in rows.groupby(["model", "group"]):
        t = t.copy()
        lengths = sorted(t["context_length"].unique())
        t["depth"], binned = depth_axis(t, MAX_HEATMAP_DEPTHS if len(lengths) > 1 else MAX_LINE_DEPTHS)
        labels = {d: f"{d:g}" for d in sorted(t["depth"].unique())}
        suffix = _slug(group) + (f"_{_slug(model)}" if several_models else "")
        tasks = sorted(t["task"].unique())
        averaged = ", ".join(tasks) if len(tasks) <= 3 else f"{len(tasks)} tasks"
        what = f" (mean of {averaged})" if len(tasks) > 1 else "" if tasks[0] == group else f" ({tasks[0]})"
        title = f"{model}: {group}{what}"
        if len(lengths) > 1:
            figures.append((f"niah_heatmap_{suffix}", _depth_heatmaps(t, labels, lengths, binned, title)))
        elif len(labels) > 1:
            figures.append((f"niah_depth_{suffix}", _depth_lines(t, labels, binned, style,
                                                                  f"{title} at {length_label(lengths[0])} tokens")))
    return figures


def niah_figures(df: pd.DataFrame, out: Path) -> list[Path]:
    paths = []
    for stem, fig in draw_depth_figures(df):
        paths.extend(_save(fig, out, stem))
    return paths


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "tasks"


def _depth_label(binned: bool) -> str:
    return f"needle depth (%, to the nearest {DEPTH_BIN})" if binned else "needle depth (%)"


def _depth_heatmaps(t: pd.DataFrame, labels: dict, lengths: list[int], binned: bool, title: str):
    """Rows: the full cache (one panel, the reference) then each evicting method; columns: keep ratios."""
    depths = sorted(labels)
    methods = sorted(m for m in t["method"].unique() if m != FULL_CACHE)
    ratios = sorted(t.loc[t["method"] != FULL_CACHE, "keep_ratio"].unique())
    top = int((t["method"] == FULL_CACHE).any())  # the full cache's row
    panels = {(top + i, j): (m, r) for i, m in enumerate(methods) for j, r in enumerate(ratios)}
    if top:
        panels[(0, 0)] = (FULL_CACHE, FULL_KEEP_RATIO)
    n_rows, n_cols = len(methods) + top, max(1, len(ratios))
    w, h = max(1.9, 0.5 * len(lengths) + 0.9), min(3.2, max(1.5, 0.26 * len(depths) + 0.8))
    every = -(-len(depths) // 12)  # at most 12 depth labels a panel
    fig = pyplot().figure(figsize=(w * n_cols + 1.6, h * n_rows + 0.9), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    scores = cell_scores(t, ["method", "keep_ratio", "depth", "context_length"])
    im = None
    for (i, j), ax in np.ndenumerate(axes):
        if (i, j) not in panels:
            ax.set_visible(False)
            continue
        method, ratio = panels[(i, j)]
        grid = _grid(scores, method, ratio, depths, lengths)
        im = score_image(ax, grid)
        if grid.size <= 80:
            annotate(ax, grid)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths], rotation=0 if len(lengths) <= 6 else 45)
        shown = range(0, len(depths), every)
        ax.set_yticks(shown, [labels[depths[y]] for y in shown] if j == 0 else [])
        ax.tick_params(labelsize=8, labelbottom=bool(i == n_rows - 1 or (top and i == 0)))
        if method == FULL_CACHE:
            ax.set_title(FULL_LABEL, fontsize=9, fontweight="bold")
            ax.set_ylabel(_depth_label(binned), fontsize=8)
            continue
        if i == top:
            ax.set_title(f"keep {ratio:g}", fontsize=9, fontweight="bold")
        if j == 0:
            ax.set_ylabel(f"{method}\n{_depth_label(binned)}", fontsize=8)
    fig.supxlabel("context length (tokens)", fontsize=9)
    fig.suptitle(f"{title}: score by needle depth and context length", fontsize=10)
    from matplotlib.image import AxesImage

    missing = any(np.isnan(a.get_array().filled(np.nan)).any() for a in fig.findobj(AxesImage))
    fig.colorbar(im, ax=[ax for ax in axes.flat if ax.get_visible()], shrink=0.6,
                 label=SCORE_LABEL + ("; grey: not run" if missing else ""))
    return fig


def _grid(scores: pd.Series, method: str, ratio: float, depths: list, lengths: list[int]) -> np.ndarray:
    out = np.full((len(depths), len(lengths)), np.nan)
    for (m, r, d, n), v in scores.items():
        if m == method and abs(r - ratio) < 1e-9:
            out[depths.index(d), lengths.index(n)] = v
    return out


def _depth_lines(t: pd.DataFrame, labels: dict, binned: bool, style: dict, title: str):
    """A panel per keep ratio: score vs depth, a line per evicting method, the full cache's dashed line."""
    depths = sorted(labels)
    ratios = sorted(t.loc[t["method"] != FULL_CACHE, "keep_ratio"].unique()) or [FULL_KEEP_RATIO]
    scores = cell_scores(t, ["method", "keep_ratio", "depth"])
    has_full = FULL_CACHE in t["method"].values
    full = scores.xs(FULL_CACHE, level="method").droplevel("keep_ratio").sort_index() if has_full else None
    fig, axes = panel_grid(len(ratios), 4, 3.6, 3.0, extra_w=1.8, sharey=True)
    for ax, ratio in zip(axes, ratios):
        if full is not None:
            ax.plot(full.index, full.values, label=FULL_LABEL, **FULL_STYLE)
        at = scores[[abs(r - ratio) < 1e-9 and m != FULL_CACHE for m, r, _ in scores.index]]
        for method in sorted(at.index.get_level_values("method").unique()):
            line = at.xs(method, level="method").droplevel("keep_ratio").sort_index()
            ax.plot(line.index, line.values, label=method, markersize=5, **style[method])
        ax.set_title(f"keep {ratio:g}", fontsize=9)
        ax.set_xlabel(_depth_label(binned), fontsize=8)
        ax.set_ylabel(SCORE_LABEL, fontsize=8)
        ax.set_xlim(-3, 103)
        ax.set_xticks(depths if not binned and len(depths) <= 6 else range(0, 101, 20))
        ax.tick_params(labelsize=8)
        _score_axis(ax)
    fig.suptitle(f"{title}: score by needle depth", fontsize=10)
    _legend(fig, axes)
    return fig
