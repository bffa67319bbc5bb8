"""LagKV (kvpress LagKVPress): kvbench method lagkv (preset kvpress: 4 sinks). At lag 128 the 200 / 220 ids are
shorter than n_sink + 2 * lag_size, so kvpress's short-prompt fallback (sinks, then the most recent tokens)
decides; lag 32 scores 5 partitions against their successors."""


def cases():
    from kvpress.presses.lagkv_press import LagKVPress

    return [
        {"press": "LagKVPress", "attn": "sdpa", "factory": lambda cr: LagKVPress(compression_ratio=cr),
         "method": "lagkv", "overrides": {}, "topk": True},
        {"press": "LagKVPress(lag_size=32)", "attn": "sdpa",
         "factory": lambda cr: LagKVPress(compression_ratio=cr, lag_size=32),
         "method": "lagkv", "overrides": {"lag_size": 32}, "topk": True},
    ]
