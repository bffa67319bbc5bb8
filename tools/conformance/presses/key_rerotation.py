"""Key re-rotation (kvpress KeyRerotationPress around KnormPress): kvbench knorm with method.rerotate_keys=true.
Rows are matched by value and rotation (match_rerotated) and channels 0 and d/2 of every
re-rotated key are recorded, for tests/test_rerotation.py."""


def cases():
    from kvpress import KeyRerotationPress, KnormPress

    return [{"press": "KeyRerotationPress(KnormPress)", "attn": "sdpa",
             "factory": lambda cr: KeyRerotationPress(press=KnormPress(compression_ratio=cr)),
             "method": "knorm", "overrides": {"rerotate_keys": True}, "topk": False, "match": "rerotated",
             "key_channels": True}]
