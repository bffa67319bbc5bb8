"""SimLayerKV (kvpress SimLayerKVPress): kvbench method simlayerkv, preset kvpress, with the press's threshold rule
(``method.allocator.lazy_threshold``; kvpress's ``n_recent`` is ``method.scorer.recent``). The press takes no compression ratio (its lazy layers keep ``n_initial`` +
``n_recent - n_last`` entries, the others all), so its three ratios are one case each, kept for the grid; two
thresholds and windows chosen on the tiny models so that some layers are lazy and others not in every family and
mode (n_recent 64 / threshold 0.3, n_recent 32 / threshold 0.2; n_initial 4, n_last 1, kvpress's defaults)."""

SETTINGS = [(0.3, 64), (0.2, 32)]


def cases():
    from kvpress.presses.simlayerkv_press import SimLayerKVPress

    out = []
    for threshold, recent in SETTINGS:
        out.append({"press": f"SimLayerKVPress(lazy_threshold={threshold},n_recent={recent})", "attn": "sdpa",
                    "factory": lambda cr, t=threshold, r=recent: SimLayerKVPress(lazy_threshold=t, n_recent=r),
                    "method": "simlayerkv", "overrides": {"lazy_threshold": threshold, "recent": recent},
                    "topk": False})
    return out
