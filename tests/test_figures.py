"""The report's figures read at a glance: layout facts of each figure drawn from synthetic rows (no model runs),
never pixels. The full cache appears once (a reference line or panel, never a method at each ratio), NIAH depth
grids are a panel per method x keep ratio with one colour scale on the NIAH red-to-green map, and a run of one
context length draws score vs depth instead of one-column heatmaps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import AxesImage

from harness.figures import FULL_LABEL, SCORE_CMAP, pyplot


def make_row(task="ruler/niah_single_1", method="snapkv", ratio=0.5, score=1.0, *, sample_id=0, length=1024,
             depth=None, model="m", run_dir="run", **extra) -> dict:
    meta = {} if depth is None else {"depth": depth}
    return {"task": task, "sample_id": sample_id, "method": method, "keep_ratio": ratio, "model": model,
            "score": score, "error": None, "context_length": length, "meta": meta, "failed": False,
            "run_dir": run_dir, **extra}


def write_runs(root: Path, rows: list[dict]) -> Path:
    """``rows`` as run dirs below ``root`` (one per run_dir), as kvbench writes them."""
    for run_dir in sorted({r["run_dir"] for r in rows}):
        d = root / run_dir
        d.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({k: v for k, v in r.items() if k not in ("failed", "run_dir")})
                 for r in rows if r["run_dir"] == run_dir]
        (d / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def needle_found(method: str, ratio: float, depth: float) -> float:
    """The synthetic truth: the full cache finds every needle, snapkv those in the first half (and all at keep
    0.5), knorm none."""
    if method == "full":
        return 1.0
    if method == "snapkv":
        return 1.0 if depth <= 50 or ratio >= 0.5 else 0.0
    return 0.0


def depth_grid(lengths, depths, methods=("full", "snapkv", "knorm"), ratios=(0.25, 0.5), samples=2,
               task="ruler/niah_single_1") -> pd.DataFrame:
    rows = [make_row(task, m, r, needle_found(m, r, d), sample_id=f"{n}/{d}/{s}", length=n, depth=d)
            for m in methods for r in ratios for n in lengths for d in depths for s in range(samples)]
    return pd.DataFrame(rows)


@pytest.fixture
def close_all():
    yield
    pyplot().close("all")


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def legend_labels(fig) -> list[str]:
    assert len(fig.legends) == 1  # one legend for the figure, outside the panels
    return [t.get_text() for t in fig.legends[0].get_texts()]


# ---------------------------------------------------------------------------------------------- NIAH depth
def test_depth_x_length_grid_is_methods_by_ratios_with_full_once(close_all):
    from harness.depth_figures import draw_depth_figures

    figures = draw_depth_figures(depth_grid([1024, 2048, 4096], [0, 50, 100]))
    assert [stem for stem, _ in figures] == ["niah_heatmap_ruler_niah"]
    fig = figures[0][1]
    axes = visible_axes(fig)
    assert len(axes) == 1 + 2 * 2  # the full cache once, then knorm and snapkv at each of the two ratios
    assert {ax.get_subplotspec().get_gridspec().get_geometry() for ax in axes} == {(3, 2)}
    titles = [ax.get_title() for ax in axes]
    assert titles.count(FULL_LABEL) == 1 and sum("full" in t for t in titles) == 1
    assert titles[1:3] == ["keep 0.25", "keep 0.5"]  # column headers above the first method's row
    assert [ax.get_ylabel().split("\n")[0] for ax in axes if ax.get_subplotspec().colspan.start == 0] == [
        "needle depth (%)", "knorm", "snapkv"]
    images = [im for ax in axes for im in ax.get_images()]
    assert len(images) == 5 and {im.get_cmap().name for im in images} == {SCORE_CMAP}
    assert {im.get_clim() for im in images} == {(0, 100)}  # one scale for every panel
    assert len(colorbars(fig)) == 1
    # snapkv at keep 0.25: needles at depth 0 and 50 found at every length, 100 missed (depth down, length across)
    snap = next(ax for ax in axes if ax.get_ylabel().startswith("snapkv")).get_images()[0].get_array()
    assert np.array_equal(snap, [[100, 100, 100], [100, 100, 100], [0, 0, 0]])
    lengths = [t.get_text() for t in axes[-1].get_xticklabels()]
    assert lengths == ["1K", "2K", "4K"] and fig.get_supxlabel() == "context length (tokens)"


def test_one_context_length_draws_score_vs_depth_not_a_heatmap(close_all):
    from harness.depth_figures import draw_depth_figures

    figures = draw_depth_figures(depth_grid([2048], [10, 50, 90]))
    assert [stem for stem, _ in figures] == ["niah_depth_ruler_niah"]
    fig = figures[0][1]
    assert fig.findobj(AxesImage) == []
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["keep 0.25", "keep 0.5"]  # a panel per ratio, none for full
    assert all(ax.get_xlabel() == "needle depth (%)" and ax.get_ylabel() == "score (0-100)" for ax in axes)
    for ax in axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {FULL_LABEL, "knorm", "snapkv"}  # methods side by side, the full cache as reference
        assert list(lines[FULL_LABEL].get_xdata()) == [10, 50, 90] and set(lines[FULL_LABEL].get_ydata()) == {100}
    assert list(axes[0].get_lines()[-1].get_ydata()) == [100, 100, 0]  # snapkv at 0.25 misses the deep needle
    assert legend_labels(fig) == [FULL_LABEL, "knorm", "snapkv"]
    assert "at 2K tokens" in fig.get_suptitle()


def test_depths_drawn_at_random_are_rounded_to_the_nearest_ten(close_all):
    from harness.depth_figures import draw_depth_figures

    rng = np.random.default_rng(0)
    rows = [make_row("ruler/niah_single_1", m, 0.5, 1.0, sample_id=i, length=4096, depth=int(rng.integers(0, 101)))
            for m in ("full", "snapkv") for i in range(40)]
    (_, fig), = draw_depth_figures(pd.DataFrame(rows))
    ax = visible_axes(fig)[0]
    assert ax.get_xlabel() == "needle depth (%, to the nearest 10)"
    xs = {x for line in ax.get_lines() for x in line.get_xdata()}
    assert xs <= set(range(0, 101, 10)) and len(xs) > 5


def test_a_fine_depth_grid_keeps_every_depth_in_the_heatmap(close_all):
    """gkamradt's 35-depth grid, one sample a cell at two lengths: 35 heatmap rows as run, a label every third."""
    from harness.depth_figures import draw_depth_figures

    depths = [int(d) for d in np.round(np.linspace(0, 100, num=35))]
    (_, fig), = draw_depth_figures(depth_grid([1024, 2048], depths, samples=1, task="niah"))
    ax = visible_axes(fig)[0]
    assert ax.get_images()[0].get_array().shape == (35, 2) and ax.get_ylabel() == "needle depth (%)"
    assert [t.get_text() for t in ax.get_yticklabels()][:3] == ["0", "9", "18"]
    assert fig.get_size_inches()[1] < 14  # panels of a fine grid are not stretched one row per depth


def test_every_task_with_depths_gets_a_figure_by_task_group(close_all):
    """Not only ruler/niah_*: any task whose rows carry meta["depth"] (InfiniteBench, the niah grid task); RULER's
    niah tasks share one figure (their mean), tasks without depths get none."""
    from harness.depth_figures import draw_depth_figures

    df = pd.concat([depth_grid([1024], [0, 100], task=t) for t in
                    ("ruler/niah_single_1", "ruler/niah_multikey_1", "infinitebench/passkey", "niah")]
                   + [depth_grid([1024, 2048], [0, 100], task="niah_grid")]
                   + [pd.DataFrame([make_row("ruler/vt", "snapkv", 0.5, 1.0)])], ignore_index=True)
    figures = dict(draw_depth_figures(df))
    assert sorted(figures) == ["niah_depth_infinitebench", "niah_depth_niah", "niah_depth_ruler_niah",
                               "niah_heatmap_niah_grid"]
    assert "(mean of ruler/niah_multikey_1, ruler/niah_single_1)" in figures["niah_depth_ruler_niah"].get_suptitle()


def test_a_failed_row_or_a_single_depth_draws_nothing(close_all):
    from harness.depth_figures import draw_depth_figures

    one_depth = depth_grid([1024], [50])
    assert draw_depth_figures(one_depth) == []
    failed = depth_grid([1024], [0, 100]).assign(failed=True)
    assert draw_depth_figures(failed) == []


def test_score_colormap_is_red_at_zero_and_green_at_100():
    from harness.figures import score_cmap

    cmap = score_cmap()
    (r0, g0, _, _), (r1, g1, _, _) = cmap(0.0), cmap(1.0)
    assert cmap.name == SCORE_CMAP and r0 > 0.9 > g0 and g1 > 0.8 > r1


# ---------------------------------------------------------------------------------------------- score figures
def score_rows() -> pd.DataFrame:
    """full at each ratio of a sweep (as kvbench runs it) and two methods on two task groups."""
    rows = []
    for t, base in (("ruler/niah_single_1", 1.0), ("ruler/vt", 0.5)):
        for r in (0.1, 0.25, 0.5):
            rows.append(make_row(t, "full", r, base))
            rows.append(make_row(t, "snapkv", r, base * r * 2))
            rows.append(make_row(t, "knorm", r, base * r))
    return pd.DataFrame(rows)


def test_score_vs_keep_ratio_draws_full_once_as_a_reference_line(close_all):
    from harness.figures import draw_score_lines
    from harness.metrics import full_once, mean_over_tasks, score_table

    table = score_table(full_once(score_rows()))
    fig = draw_score_lines(mean_over_tasks(table, ["model", "method", "keep_ratio"]).reset_index(), "keep_ratio",
                           "keep ratio")
    (ax,) = visible_axes(fig)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {FULL_LABEL, "knorm", "snapkv"}
    assert set(lines[FULL_LABEL].get_ydata()) == {75.0}  # horizontal: (100 + 50) / 2 over the two tasks
    assert list(lines["snapkv"].get_xdata()) == [0.1, 0.25, 0.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "0.25", "0.5"]
    assert ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 100 and "score (0-100)" in ax.get_ylabel()
    assert legend_labels(fig) == [FULL_LABEL, "knorm", "snapkv"]


def test_score_by_group_wraps_panels_and_shares_one_legend(close_all):
    from harness.figures import draw_score_by_group
    from harness.metrics import full_once, score_table

    rows = score_rows()
    more = [make_row(f"longbench/{d}", m, 0.5, 0.5) for d in ("qasper", "gov_report", "lcc")
            for m in ("full", "snapkv")]
    table = score_table(full_once(pd.concat([rows, pd.DataFrame(more)], ignore_index=True)))
    fig = draw_score_by_group(table)
    axes = visible_axes(fig)
    assert len(axes) == 5 and {ax.get_subplotspec().get_gridspec().get_geometry() for ax in axes} == {(2, 4)}
    assert all(ax.get_legend() is None for ax in axes) and legend_labels(fig)[0] == FULL_LABEL
    for ax in axes:
        assert [line.get_label() for line in ax.get_lines()].count(FULL_LABEL) == 1


def test_task_heatmap_has_the_full_cache_as_one_top_row(close_all):
    from harness.figures import draw_task_heatmap
    from harness.metrics import full_once, score_table

    fig = draw_task_heatmap(score_table(full_once(score_rows())))
    (ax,) = visible_axes(fig)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [FULL_LABEL, "knorm", "snapkv"]
    assert ax.get_images()[0].get_cmap().name == SCORE_CMAP and len(colorbars(fig)) == 1
    assert np.array_equal(ax.get_images()[0].get_array()[0], [100, 50])  # full's row: niah, vt


def test_budget_heatmap_wraps_panels_with_one_colour_scale(close_all):
    from harness.figures import draw_budget_heatmap

    rows = [{"model": "m", "method": f"m{i}", "keep_ratio": 0.5, "failed": False, "context_tokens": 100,
             "budgets": [[10 * i, 90], [50, 50]]} for i in range(1, 6)]
    fig = draw_budget_heatmap(pd.DataFrame(rows))
    axes = visible_axes(fig)
    assert len(axes) == 5 and {ax.get_subplotspec().get_gridspec().get_geometry() for ax in axes} == {(2, 4)}
    assert len(colorbars(fig)) == 1 and {im.get_clim() for ax in axes for im in ax.get_images()} == {(0, 0.9)}
    assert all((ax.get_xlabel(), ax.get_ylabel()) == ("KV head", "layer") for ax in axes)


def test_report_writes_the_depth_figure_of_a_length_grid(tmp_path):
    from harness.report import write_report

    runs = write_runs(tmp_path / "runs", depth_grid([1024, 2048], [0, 100]).to_dict("records"))
    names = {p.name for p in write_report(runs, tmp_path / "out")}
    assert {"niah_heatmap_ruler_niah.png", "niah_heatmap_ruler_niah.pdf"} <= names
    assert not any(n.startswith("niah_depth") for n in names)
