"""CapKV (kvpress CapPress, defaults): kvbench method cap."""


def cases():
    from kvpress.presses.cap_press import CapPress

    return [{"press": "CapPress", "attn": "sdpa", "factory": lambda cr: CapPress(compression_ratio=cr),
             "method": "cap", "overrides": {}, "topk": True}]
