"""CriticalKV (kvpress CriticalKVPress, defaults epsilon 1e-4, first_stage_ratio 0.5) on SnapKV and on Knorm:
kvbench method criticalkv (base snapkv, or base knorm without the recent window). CriticalKVPress's ``score`` is
the final two-stage score, whose top-k kvpress keeps (topk: the cut's ties are recorded); stage 1's ties (SnapKV's
window larger than stage 1) are added by ``_wrapped_ties.criticalkv_near_ties``."""
import _wrapped_ties as ties  # tools/conformance/presses/ is on the path (dump_kvpress._load_group)


def cases():
    from kvpress.presses.criticalkv_press import CriticalKVPress
    from kvpress.presses.knorm_press import KnormPress
    from kvpress.presses.snapkv_press import SnapKVPress

    def press(base):
        wrapper = CriticalKVPress(base)
        return ties.capture(wrapper, base)

    return [
        {"press": "CriticalKVPress(SnapKVPress)", "attn": "sdpa", "method": "criticalkv", "overrides": {},
         "factory": lambda cr: press(SnapKVPress(compression_ratio=cr)), "topk": True,
         "near_ties": ties.criticalkv_near_ties},
        # Knorm has no protected tokens: no tie inside a forced window at any ratio
        {"press": "CriticalKVPress(KnormPress)", "attn": "sdpa", "method": "criticalkv",
         "overrides": {"base": "knorm", "n_recent": 0},
         "factory": lambda cr: press(KnormPress(compression_ratio=cr)), "topk": True,
         "near_ties": ties.criticalkv_near_ties},
    ]
