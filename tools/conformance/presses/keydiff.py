"""KeyDiff (kvpress KeyDiffPress, defaults): kvbench method keydiff."""


def cases():
    from kvpress.presses.keydiff_press import KeyDiffPress

    return [{"press": "KeyDiffPress", "attn": "sdpa", "factory": lambda cr: KeyDiffPress(compression_ratio=cr),
             "method": "keydiff", "overrides": {}, "topk": True}]
