"""Leverage scores (kvpress LeverageScorePress, sketch 48 from torch's global generator): kvbench method leverage,
with its own sketch (48 columns from the layer's generator) and exact (sketch_dimension null). On these models
head_dim = 16 < 48, so the sketch enters kvpress's scores only through the 1e-2 Cholesky jitter (see
methods/leverage.py); a sketch of exactly head_dim columns would not be comparable (badly conditioned Phi)."""


def cases():
    from kvpress.presses.leverage_press import LeverageScorePress

    factory = lambda cr: LeverageScorePress(compression_ratio=cr)
    return [
        {"press": "LeverageScorePress", "attn": "sdpa", "factory": factory, "method": "leverage", "overrides": {},
         "topk": True},
        {"press": "LeverageScorePress[vs exact]", "attn": "sdpa", "factory": factory, "method": "leverage",
         "overrides": {"sketch_dimension": None}, "topk": True},
    ]
