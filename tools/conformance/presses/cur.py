"""CurDKV (kvpress CURPress, defaults: kv_product, local windows of 16 aligned at token 0, 4 sinks, no random
projection): kvbench method cur (preset kvpress: window_align start)."""


def cases():
    from kvpress.presses.cur_press import CURPress

    return [{"press": "CURPress", "attn": "sdpa", "factory": lambda cr: CURPress(compression_ratio=cr),
             "method": "cur", "overrides": {}, "topk": True}]
