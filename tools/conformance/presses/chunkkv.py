"""ChunkKV (kvpress ChunkKVPress, chunk_length 20) on Knorm and on SnapKV: kvbench method chunkkv (base knorm
without the recent window, or base snapkv). ChunkKVPress keeps whole chunks, not a top-k of a score: kept sets
are compared exactly, outside the tokens of chunks tied with the last kept one (``_wrapped_ties.chunkkv_near_ties``:
SnapKV's window chunks all score max + 1)."""
import _wrapped_ties as ties  # tools/conformance/presses/ is on the path (dump_kvpress._load_group)


def cases():
    from kvpress.presses.chunkkv_press import ChunkKVPress
    from kvpress.presses.knorm_press import KnormPress
    from kvpress.presses.snapkv_press import SnapKVPress

    def press(base):
        return ties.capture(ChunkKVPress(base), base)

    return [
        {"press": "ChunkKVPress(KnormPress)", "attn": "sdpa", "method": "chunkkv",
         "overrides": {"base": "knorm", "n_recent": 0},
         "factory": lambda cr: press(KnormPress(compression_ratio=cr)), "topk": False,
         "near_ties": ties.chunkkv_near_ties},
        {"press": "ChunkKVPress(SnapKVPress)", "attn": "sdpa", "method": "chunkkv", "overrides": {},
         "factory": lambda cr: press(SnapKVPress(compression_ratio=cr)), "topk": False,
         "near_ties": ties.chunkkv_near_ties},
    ]
