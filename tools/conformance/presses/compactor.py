"""Compactor (kvpress CompactorPress, defaults: 8 + 4 kept, chunks of 256, sketch 48, blending = compression
ratio): kvbench method compactor (one prefill per ratio, as its blending depends on it)."""


def cases():
    from kvpress.presses.compactor_press import CompactorPress

    return [{"press": "CompactorPress", "attn": "sdpa", "factory": lambda cr: CompactorPress(compression_ratio=cr),
             "method": "compactor", "overrides": {}, "topk": True}]
