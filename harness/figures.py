"""Heatmaps drawn by the report when the runs hold what they need (PNG and PDF)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=120)
    _plt().close(fig)
    return paths


def niah_heatmap(df: pd.DataFrame, out: Path) -> list[Path]:
    """Score by needle depth x context length, one panel per (method, keep ratio), for ruler/niah_* tasks."""
    if "meta" not in df:
        return []
    sub = df[df["task"].str.startswith("ruler/niah") & ~df["failed"]].copy()
    sub["depth"] = sub["meta"].map(lambda m: m.get("depth") if isinstance(m, dict) else None)
    sub = sub.dropna(subset=["depth"])
    if sub.empty or sub["depth"].nunique() < 2:
        return []
    plt = _plt()
    groups = list(sub.groupby(["method", "keep_ratio"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, ((method, ratio), g) in zip(axes[0], groups):
        grid = g.pivot_table(index="depth", columns="context_length", values="score", aggfunc="mean") * 100
        im = ax.imshow(grid.values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], rotation=45)
        ax.set_yticks(range(grid.shape[0]), [f"{d:g}" for d in grid.index])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth (%)")
        ax.set_title(f"{method} @ {ratio:g}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score")
    return _save(fig, out, "niah_heatmap")


def budget_heatmap(df: pd.DataFrame, out: Path) -> list[Path]:
    """Mean share of the context each (layer, KV head) kept, for runs whose heads got different budgets."""
    if "budgets" not in df:
        return []
    ok = df[~df["failed"] & df["budgets"].map(lambda b: isinstance(b, list) and len(b) > 0)]
    panels = []
    for (method, ratio), g in ok.groupby(["method", "keep_ratio"]):
        shares = [np.asarray(b, dtype=float) / max(1, n) for b, n in zip(g["budgets"], g["context_tokens"])]
        mean = np.mean(np.stack(shares), axis=0)
        if np.ptp(mean) > 1e-9:  # uniform budgets say nothing
            panels.append((method, ratio, mean))
    if not panels:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 4), squeeze=False)
    for ax, (method, ratio, mean) in zip(axes[0], panels):
        im = ax.imshow(mean, cmap="viridis", aspect="auto", vmin=0)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_title(f"{method} @ {ratio:g}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label="kept share")
    return _save(fig, out, "budget_heatmap")
