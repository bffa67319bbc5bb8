"""The table printed at the end of a run."""
from __future__ import annotations


def print_metrics(metrics: dict, out_dir) -> None:
    print(f"\nresults: {out_dir}")
    for method, by_ratio in metrics.items():
        for ratio, entry in by_ratio.items():
            mean = "n/a" if entry["mean"] is None else f"{entry['mean']:.1f}"
            errors = f", {entry['n_errors']} failed" if entry["n_errors"] else ""
            tasks = "  ".join(f"{t}={s:.1f}" for t, s in entry["tasks"].items())
            print(f"  {method:<20} keep={ratio:<6} mean={mean:<6} (n={entry['n']}{errors})  {tasks}")
