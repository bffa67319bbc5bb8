"""Entropy-gated ChunkKV (kvpress EntropyGatedChunkKVPress, chunk_length 10, low_entropy_chunk_length 4) on Knorm
and on SnapKV: kvbench method entropy_chunkkv (base knorm without the recent window, or base snapkv). Not a top-k
of a score: kept sets compared exactly, outside the chunks tied with the one where kvpress's greedy pass runs out of
budget (``_wrapped_ties.entropy_chunkkv_near_ties``: SnapKV's window chunks all score max + 1)."""
import _wrapped_ties as ties  # tools/conformance/presses/ is on the path (dump_kvpress._load_group)


def cases():
    from kvpress.presses.entropy_gated_chunkkv_press import EntropyGatedChunkKVPress
    from kvpress.presses.knorm_press import KnormPress
    from kvpress.presses.snapkv_press import SnapKVPress

    def press(base):
        return ties.capture(EntropyGatedChunkKVPress(base), base)

    return [
        {"press": "EntropyGatedChunkKVPress(KnormPress)", "attn": "sdpa", "method": "entropy_chunkkv",
         "overrides": {"base": "knorm", "n_recent": 0},
         "factory": lambda cr: press(KnormPress(compression_ratio=cr)), "topk": False,
         "near_ties": ties.entropy_chunkkv_near_ties},
        {"press": "EntropyGatedChunkKVPress(SnapKVPress)", "attn": "sdpa", "method": "entropy_chunkkv",
         "overrides": {}, "factory": lambda cr: press(SnapKVPress(compression_ratio=cr)), "topk": False,
         "near_ties": ties.entropy_chunkkv_near_ties},
    ]
