"""The KV cache while decoding (issue #26: compression while decoding), from the rows' ``kv_footprint``.

A row's ``kv_footprint`` lists points ``{generated, entries_mean, entries_max, bytes}`` in generation order: one
after the prefill's compression (generated 0), a point right before and one right after each decode-time
compression (the same ``generated``), and one at the end of decoding. Between two points the cache grows by one
entry per head per generated token, so a row's footprint is piecewise linear in the tokens generated, with a drop
at each compression: a sawtooth. A row without decode-time compression has the start and end points only.

- ``footprint_mean``: the mean over the generation of that piecewise footprint (its area over the tokens
  generated); ``footprint_rows`` gives each row's mean and max (the runner's ``kv_mean_entries`` /
  ``kv_mean_bytes`` where the row has them, else this mean).
- ``kv_footprint_<group>``: entries per head (mean over layers and heads) vs tokens generated, a line per
  (method, keep ratio), the mean over samples of their footprints (``mean_curve``), a panel per (model, context
  length), one figure per task group (``figures.task_group``).
- ``score_vs_footprint_<group>``: score vs the mean footprint over the generation, a point per (method, keep
  ratio), a panel per model.

Both draw the full cache once (keep 1.0) as the dashed black reference, as every report figure does.
"""
from __future__ import annotations

from bisect import bisect_left
from pathlib import Path

import numpy as np
import pandas as pd

from harness.depth_figures import _slug, length_label
from harness.footprint import mean_footprint as footprint_mean
from harness.figures import (FULL_LABEL, FULL_STYLE, SCORE_LABEL, _legend, _method_lines, _save, _score_axis,
                             log_axis, method_styles, panel_grid, task_group)
from harness.metrics import FULL_CACHE

ENTRIES_LABEL = "KV entries per head (mean over layers and heads)"
LOG_Y_SPREAD = 20  # a panel whose lines span more than this factor gets a log y axis: 256-entry sawtooths stay
                   # visible beside a 32K-token full cache


def check_footprint(value) -> str | None:
    """What is wrong with a row's ``kv_footprint`` (None when it is absent, empty or well formed): a list of points
    with an integer ``generated`` >= 0, not decreasing, and numeric ``entries_mean`` (``entries_max``, ``bytes``
    numeric where given)."""
    if value is None or value == []:  # a row that recorded none (a failed sample): nothing to draw
        return None
    if not isinstance(value, list):
        return f"{value!r} is not a list of points"
    last = 0
    for i, p in enumerate(value):
        if not isinstance(p, dict):
            return f"point {i} ({p!r}) is not an object"
        g = p.get("generated")
        if not isinstance(g, int) or isinstance(g, bool) or g < 0:
            return f"point {i} has generated {g!r}, not an integer >= 0"
        if g < last:
            return f"point {i} has generated {g} after {last}: points must be in generation order"
        last = g
        for k in ("entries_mean", "entries_max", "bytes"):
            v = p.get(k)
            if (k == "entries_mean" or v is not None) and not _number(v):
                return f"point {i} has {k} {v!r}, not a number >= 0"
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _breaks(points: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    """The distinct ``generated`` of the points and, at each, the first and the last value of ``key``: before and
    after a compression there (equal where nothing was compressed)."""
    xs: list[int] = []
    first: list[float] = []
    last: list[float] = []
    for p in points:
        x, y = int(p["generated"]), float(p[key])
        if xs and xs[-1] == x:
            last[-1] = y
        else:
            xs.append(x)
            first.append(y)
            last.append(y)
    return xs, first, last


def _value_at(breaks, x: int, side: str) -> float:
    """The footprint at ``x`` approached from the ``left`` (before a compression at ``x``) or the ``right``."""
    xs, first, last = breaks
    i = bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return first[i] if side == "left" else last[i]
    lo, hi = i - 1, i  # xs[lo] < x < xs[hi]
    t = (x - xs[lo]) / (xs[hi] - xs[lo])
    return last[lo] + t * (first[hi] - last[lo])


def mean_curve(footprints: list[list[dict]], key: str = "entries_mean") -> tuple[list[float], list[float]]:
    """The mean over samples of their footprints, as points to draw (a drop is two points at one x). At each x
    the mean is over the samples still generating there; where one stops the mean of the others can step."""
    samples = [_breaks(p, key) for p in footprints]
    grid = sorted({x for xs, _, _ in samples for x in xs})
    out_x: list[float] = []
    out_y: list[float] = []
    for x in grid:
        left = [_value_at(s, x, "left") for s in samples if s[0][0] <= x <= s[0][-1]]
        right = [_value_at(s, x, "right") for s in samples if s[0][0] <= x < s[0][-1]]
        for vals in (left, right):
            if vals and not (out_x and out_x[-1] == x and out_y[-1] == float(np.mean(vals))):
                out_x.append(x)
                out_y.append(float(np.mean(vals)))
    return out_x, out_y


def footprint_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that did not fail and carry ``kv_footprint``: model, method, keep_ratio, task, group,
    context_length, score (x100), footprint (the points), generated (tokens), mean_entries / mean_bytes (the
    row's ``kv_mean_entries`` / ``kv_mean_bytes`` where it has them, else ``footprint_mean``) and max_entries (the
    largest ``entries_max`` of its points: the largest head's cache)."""
    cols = ["model", "method", "keep_ratio", "task", "group", "context_length", "score", "footprint", "generated",
            "mean_entries", "max_entries", "mean_bytes"]
    if "kv_footprint" not in df:
        return pd.DataFrame(columns=cols)
    ok = df[~df["failed"] & df["kv_footprint"].map(lambda v: isinstance(v, list) and len(v) > 0)]
    out = []
    for _, r in ok.iterrows():
        points = r["kv_footprint"]
        mean = _field(r, "kv_mean_entries")
        mean_bytes = _field(r, "kv_mean_bytes")
        if mean_bytes is None and all(_number(p.get("bytes")) for p in points):
            mean_bytes = footprint_mean(points, "bytes")
        generated = _field(r, "generated_tokens")
        out.append({
            "model": r["model"], "method": r["method"], "keep_ratio": r["keep_ratio"], "task": r["task"],
            "group": task_group(r["task"]), "context_length": _field(r, "context_length"),
            "score": 100.0 * r["score"], "footprint": points,
            "generated": points[-1]["generated"] if generated is None else generated,
            "mean_entries": footprint_mean(points) if mean is None else mean,
            "max_entries": max(float(p.get("entries_max", p["entries_mean"])) for p in points),
            "mean_bytes": float("nan") if mean_bytes is None else mean_bytes,
        })
    return pd.DataFrame(out, columns=cols)


def _field(row: pd.Series, name: str):
    v = row.get(name)
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def _line_label(method: str, ratio: float, several_ratios: bool) -> str:
    return FULL_LABEL if method == FULL_CACHE else f"{method} @ {ratio:g}" if several_ratios else method


def draw_footprint_curves(rows: pd.DataFrame) -> list[tuple[str, object]]:
    """(``kv_footprint_<group>``, figure) per task group: a panel per (model, context length), a line per
    (method, keep ratio: in the label when some method ran several) of the mean footprint over its samples."""
    figures = []
    for group, t in rows.groupby("group"):
        lengths = t["context_length"].fillna(0).astype(int)
        panels = sorted(set(zip(t["model"], lengths)))
        evicting = t[t["method"] != FULL_CACHE]
        several_ratios = bool(len(evicting)) and evicting.groupby("method")["keep_ratio"].nunique().max() > 1
        labels = {(m, r): _line_label(m, r, several_ratios) for m, r in set(zip(t["method"], t["keep_ratio"]))}
        style = method_styles([v for v in labels.values() if v != FULL_LABEL])
        fig, axes = panel_grid(len(panels), 3, 5.0, 3.6, extra_w=2.4, sharey=False)
        for ax, (model, length) in zip(axes, panels):
            sub = t[(t["model"] == model) & (lengths == length)]
            curves = {key: mean_curve(list(g["footprint"])) for key, g in sub.groupby(["method", "keep_ratio"])}
            spread = [v for _, ys in curves.values() for v in (min(ys), max(ys))]
            log = min(spread) > 0 and max(spread) / min(spread) > LOG_Y_SPREAD
            for (method, ratio), (xs, ys) in sorted(curves.items()):
                label = labels[(method, ratio)]
                line = FULL_STYLE if method == FULL_CACHE else {**style[label], "marker": None}
                ax.plot(*(_straight_on_log(xs, ys) if log else (xs, ys)), label=label, **{**line, "linewidth": 1.4})
            n = sub.groupby(["method", "keep_ratio"]).size()
            at = f", {length_label(length)}-token contexts" if length else ""
            samples = f"{n.min()}-{n.max()}" if n.min() != n.max() else f"{n.min()}"
            ax.set_title(f"{model}{at} (mean of {samples} samples a line)", fontsize=9)
            ax.set_xlabel("tokens generated")
            if log:
                log_axis(ax, "y")
            ax.set_ylabel(ENTRIES_LABEL + (", log scale" if log else ""), fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"KV cache while decoding: {group} (drops: compressions during decoding)", fontsize=10)
        _legend(fig, axes)
        figures.append((f"kv_footprint_{_slug(group)}", fig))
    return figures


def _straight_on_log(xs: list[float], ys: list[float], step: int = 8) -> tuple[list[float], list[float]]:
    """The points of a growing segment every ``step`` tokens: a log axis draws the straight line between two
    points as a straight line on screen, not the (concave) linear growth between them."""
    out_x, out_y = xs[:1], ys[:1]
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        for x in range(int(x0) + step, int(x1), step) if x1 > x0 else ():
            out_x.append(x)
            out_y.append(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
        out_x.append(x1)
        out_y.append(y1)
    return out_x, out_y


def draw_score_vs_footprint(rows: pd.DataFrame) -> list[tuple[str, object]]:
    """(``score_vs_footprint_<group>``, figure) per task group: a panel per model, score (mean over the group's
    tasks) vs mean footprint (mean over the rows), a line through each method's keep ratios (each point labelled
    with its ratio), the full cache as the dashed line and a star at its own footprint."""
    figures = []
    style = method_styles(rows["method"])
    for group, t in rows.groupby("group"):
        models = sorted(t["model"].unique())
        fig, axes = panel_grid(len(models), 3, 5.0, 3.8, extra_w=1.8, sharey=True)
        for ax, model in zip(axes, models):
            sub = t[t["model"] == model]
            keys = ["method", "keep_ratio"]
            score = sub.groupby(keys + ["task"])["score"].mean().groupby(level=keys).mean()
            size = sub.groupby(keys)["mean_entries"].mean()
            cells = pd.DataFrame({"score": score, "mean_entries": size}).reset_index()
            _method_lines(ax, cells, "mean_entries", style, full_at_x=True)
            for c in cells[cells["method"] != FULL_CACHE].itertuples():
                ax.annotate(f"{c.keep_ratio:g}", (c.mean_entries, c.score), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=style[c.method]["color"])
            log_axis(ax)
            ax.set_title(model, fontsize=10)
            ax.set_xlabel("mean KV entries per head over the generation (log scale)")
            ax.set_ylabel(f"{SCORE_LABEL}, mean over tasks")
            _score_axis(ax)
        fig.suptitle(f"Score vs KV cache while decoding: {group} (points: keep ratio)", fontsize=10)
        _legend(fig, axes)
        figures.append((f"score_vs_footprint_{_slug(group)}", fig))
    return figures


def compresses_while_decoding(df: pd.DataFrame) -> bool:
    """Whether any row compressed while decoding (``decoding`` decode or both): only then do the footprint figures
    and table say more than the keep ratio already does (every other cache just grows by one entry a token)."""
    return "decoding" in df and bool(df["decoding"].isin(["decode", "both"]).any())


def footprint_figures(df: pd.DataFrame, out: Path) -> list[Path]:
    """Both figures of every task group whose rows carry ``kv_footprint``, when some run compressed while decoding
    (none otherwise)."""
    rows = footprint_rows(df) if compresses_while_decoding(df) else pd.DataFrame()
    if rows.empty:
        return []
    paths = []
    for stem, fig in draw_footprint_curves(rows) + draw_score_vs_footprint(rows.dropna(subset=["score"])):
        paths.extend(_save(fig, out, stem))
    return paths

