"""Block-wise prefill compression (kvpress BlockPress, block_size 128 and 32, around KnormPress and KeyDiffPress):
kvbench's method.prefill_chunk. kvpress simulates the blocks on the keys of one whole prefill; kvbench really
prefills block by block on the compressed cache, so deeper layers see other hidden states by design. Layer 0's keys
depend on the token embeddings and positions only, so there both must keep the same entries: the comparison is
restricted to layer 0 (where Knorm ties every occurrence of a token: those positions are near ties)."""


def cases():
    from kvpress import BlockPress, KnormPress
    from kvpress.presses.keydiff_press import KeyDiffPress

    out = []
    for block in (128, 32):
        out.append({"press": f"BlockPress(KnormPress,block_size={block})", "attn": "sdpa",
                    "factory": lambda cr, b=block: BlockPress(press=KnormPress(compression_ratio=cr), block_size=b),
                    "method": "knorm", "overrides": {"prefill_chunk": block}, "topk": False, "layers": [0],
                    "ties_by_token": True})
        out.append({"press": f"BlockPress(KeyDiffPress,block_size={block})", "attn": "sdpa",
                    "factory": lambda cr, b=block: BlockPress(press=KeyDiffPress(compression_ratio=cr), block_size=b),
                    "method": "keydiff", "overrides": {"prefill_chunk": block}, "topk": False, "layers": [0]})
    return out
