"""AdaKV (Feng et al., 2024): head-wise budgets from one top-k over all KV heads of a layer (allocator ``adakv``).

As kvpress's ``AdaKVPress`` (0.5.5), per layer with ``T`` tokens and ``H`` KV heads:

1. ``n_kept = n_keep(T, keep_ratio, rule)`` is the average per-head budget (the method's budget rule:
   kvpress's ``int(T * (1 - cr))`` under ``preset=kvpress``); the layer keeps ``H * n_kept`` entries.
2. Floor: ``n_safe = max(1, int(n_kept * alpha))``; the top-``n_safe`` entries of every head (by that head's
   scores) are kept whatever their global rank (kvpress sets their score to ``finfo.max``).
3. The other entries compete globally: the ``H * (T - n_kept)`` lowest scores of the layer (floors excluded,
   since they rank above everything) are evicted. A head's budget is the number of its entries that survive,
   so the budgets sum exactly to ``H * n_kept``.

Forced entries (the scorer's +inf / ``max + 1`` positions, and the last ``window`` positions -- SnapKV's
observation window, which our ``snapkv`` scorer leaves at 0 for the selector to protect, while kvpress pads it
with ``max + 1`` before AdaKV's global cut) rank above every scored entry and below the floors, as in kvpress.
``window`` (``method.allocator.window``, default 0) forces that many last positions; SnapKV-based configs need not
set it: their selector's ``n_recent`` (the observation window) already reaches the allocator at +inf.

Difference from kvpress: ``alpha = 0`` still gives every head one entry (a cache head cannot be empty here;
kvpress would mask all of a head's keys).
"""
from __future__ import annotations

import torch

from harness.compress import Allocator, n_keep, register_allocator
from harness.errors import KvbenchError
from harness.schema import Fraction, NonNegative


def adakv_layer_budgets(scores: torch.Tensor, keep_ratio: float, alpha: float, n_forced_recent: int = 0,
                        rule: str = "floor") -> torch.Tensor:
    """Per-head budgets ``[H]`` of one layer from its scores ``[H, T]`` (higher = keep)."""
    s = scores.detach().float().clone()
    n_heads, n_tokens = s.shape
    if n_forced_recent > 0:
        s[:, max(0, n_tokens - n_forced_recent) :] = float("inf")
    # Forced entries (+inf) become "max finite + 1", one value for all, like kvpress's padding.
    finite = torch.isfinite(s)
    top = float(s[finite].max()) if bool(finite.any()) else 0.0
    s[s == float("inf")] = top + 1.0
    s[s == float("-inf")] = torch.finfo(s.dtype).min
    s = torch.nan_to_num(s, nan=torch.finfo(s.dtype).min)
    kept_per_head = n_keep(n_tokens, keep_ratio, rule)
    if kept_per_head >= n_tokens:
        return torch.full((n_heads,), n_tokens, dtype=torch.long)
    n_safe = min(kept_per_head, max(1, int(kept_per_head * alpha)))
    floors = s.topk(n_safe, dim=-1).indices
    s.scatter_(-1, floors, torch.finfo(s.dtype).max)
    n_total = n_heads * kept_per_head
    kept = s.reshape(-1).topk(n_total).indices  # the complement of kvpress's bottom-(H * (T - n_kept))
    return torch.bincount(kept // n_tokens, minlength=n_heads).long().cpu()


@register_allocator("adakv")
class AdaKVAllocator(Allocator):
    per_head_budgets = True
    per_layer_budgets = True

    def __init__(self, alpha: Fraction | None = 0.2, window: NonNegative | None = 0):
        self.alpha = 0.2 if alpha is None else float(alpha)
        self.window = int(window or 0)
        if not 0.0 <= self.alpha <= 1.0:
            raise KvbenchError(f"method.allocator.alpha={alpha} must be in [0, 1] (AdaKV's per-head floor share)")

    def budgets(self, scores: list[torch.Tensor], keep_ratio: float) -> torch.Tensor:
        return torch.stack([adakv_layer_budgets(s, keep_ratio, self.alpha, self.window, self.budget_rule)
                            for s in scores])
