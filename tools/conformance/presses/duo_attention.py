"""DuoAttention (kvpress DuoAttentionPress, head_compression_ratio = the case's compression ratio, as kvpress's
evaluation sets it): kvbench method duo_attention (preset kvpress: budget=heads). Both sides read the same local
pattern in the official layout (tests/fixtures/kvpress/duo_patterns/tiny/: full_attention_heads.tsv, 3 layers x
2 KV heads, and config.json with sink_size 8, recent_size 32): kvpress's press gets it in place of its download
(``load_attention_pattern`` replaced on the instance by the same read its own loader does: np.loadtxt, clipped to
[0, 1]), then builds its streaming mask itself in ``post_init_from_model``; kvbench through
``method.scorer.patterns``. The press masks instead of pruning: kept = not in ``module.masked_key_indices``."""

PATTERNS = "tests/fixtures/kvpress/duo_patterns/tiny"


def cases():
    import json

    import numpy as np

    from kvpress.presses.duo_attention_press import DuoAttentionPress

    config = json.loads(open(f"{PATTERNS}/config.json").read())
    scores = np.clip(np.loadtxt(f"{PATTERNS}/full_attention_heads.tsv", dtype=float, delimiter="\t"), 0, 1)

    def factory(cr):
        press = DuoAttentionPress(head_compression_ratio=cr)
        press.load_attention_pattern = lambda model: (config["sink_size"], config["recent_size"], scores)
        return press

    return [{"press": "DuoAttentionPress", "attn": "sdpa", "factory": factory, "method": "duo_attention",
             "overrides": {"patterns": PATTERNS}, "topk": False}]
