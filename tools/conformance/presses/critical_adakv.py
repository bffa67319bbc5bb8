"""CriticalAdaKV (kvpress CriticalAdaKVPress(SnapKVPress()), alpha_safeguard 0.2, epsilon 1e-4, first_stage_ratio
0.5): kvbench method critical_adakv. kvpress masks (module.masked_key_indices) instead of pruning: a global cut,
compared per layer in total and per head outside the near ties, which ``_wrapped_ties.critical_adakv_near_ties``
recomputes at each of kvpress's cuts (safeguard, global budget, stage 1, stage 2)."""
import _wrapped_ties as ties  # tools/conformance/presses/ is on the path (dump_kvpress._load_group)


def cases():
    from kvpress.presses.criticalkv_press import CriticalAdaKVPress
    from kvpress.presses.snapkv_press import SnapKVPress

    def press(cr):
        base = SnapKVPress(compression_ratio=cr)
        return ties.capture(CriticalAdaKVPress(base), base)

    return [{"press": "CriticalAdaKVPress(SnapKVPress)", "attn": "sdpa", "method": "critical_adakv", "overrides": {},
             "factory": press, "topk": False, "near_ties": ties.critical_adakv_near_ties}]
