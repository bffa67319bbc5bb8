"""The KV footprint of a generation (``kv_footprint`` in rows, ``harness.decoding``): arithmetic shared by the
runner's rows and the report, kept free of torch so that the report does not need it."""
from __future__ import annotations


def mean_footprint(points: list[dict], key: str = "entries_mean") -> float:
    """The mean of ``key`` over the decoding steps of a footprint (the cache grows by one entry per head per
    step between points, so each segment's mean is its trapezoid); the first point's value without steps."""
    if not points:
        return 0.0
    total = area = 0.0
    for a, b in zip(points[:-1], points[1:]):
        steps = b["generated"] - a["generated"]
        if steps > 0:
            area += steps * (a[key] + b[key]) / 2.0
            total += steps
    return area / total if total else float(points[-1][key])
