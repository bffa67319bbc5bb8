"""PyramidKV (Cai et al., 2024): per-layer budgets that decrease linearly with depth (allocator ``pyramid``).

Every KV head of a layer gets the same budget; the layer budgets form an arithmetic sequence from layer 0
(largest) to the last layer (smallest) whose mean is the uniform budget. The formula is kvpress's
``PyramidKVPress.get_layer_budget`` (itself KVCache-Factory's), with ``window`` = SnapKV's observation window
(the method config's ``window`` key, shared with the scorer) and ``beta`` the steepness::

    capacity = window + T * keep                    # "max_capacity_prompt"
    min_num  = (capacity - window) / beta
    max_num  = 2 * (capacity - window) - min_num
    if max_num >= T - window:                        # the first layer cannot keep more than the prefix
        max_num = T - window
        min_num = 2 * (capacity - window) - max_num
    if not (T >= max_num >= min_num >= window):      # degenerate pyramid: SnapKV's uniform budget
        budget = max(1, round(T * keep))               (note round(), as kvpress; uniform uses floor)
    else:
        budget(l) = round(max_num - l * (max_num - min_num) / (L - 1))   # Python round: half to even

so the budgets sum to the uniform total up to rounding (kvpress does not correct the rounding; we do not
either, to keep what kvpress keeps). ``l`` is the index among the scored layers. ``keep`` is
``harness.compress.kept_fraction(keep_ratio, rule)``: the keep ratio (budget rule floor), or kvpress's
``1 - compression_ratio`` computed in float (rule kvpress, ``method.preset=kvpress``).
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from harness.compress import Allocator, kept_fraction, register_allocator
from harness.errors import KvbenchError
from harness.schema import NonNegative


def pyramid_budget(n_tokens: int, keep_ratio: float, layer: int, n_layers: int, window: int, beta: float,
                   rule: str = "floor") -> int:
    """Budget of one layer, as kvpress 0.5.5 (``PyramidKVPress.get_layer_budget``)."""
    keep = kept_fraction(keep_ratio, rule)
    capacity = window + n_tokens * keep
    min_num = (capacity - window) / beta
    max_num = (capacity - window) * 2 - min_num
    if max_num >= n_tokens - window:
        max_num = n_tokens - window
        min_num = (capacity - window) * 2 - max_num
    if not (n_tokens >= max_num >= min_num >= window):
        return max(1, round(n_tokens * keep))
    steps = (max_num - min_num) / (n_layers - 1) if n_layers > 1 else 0.0
    return round(max_num - layer * steps)


@register_allocator("pyramid")
class PyramidAllocator(Allocator):
    per_layer_budgets = True

    def __init__(self, beta: Annotated[float, Field(ge=1.0)] | None = 20, window: NonNegative | None = 0):
        self.beta = 20.0 if beta is None else float(beta)
        self.window = int(window or 0)
        if self.beta < 1:
            raise KvbenchError(f"method.allocator.beta={beta} must be >= 1 (PyramidKV's steepness)")

    def budgets(self, scores: list[torch.Tensor], keep_ratio: float) -> torch.Tensor:
        n_layers = len(scores)
        rows = []
        for layer, s in enumerate(scores):
            n_heads, n_tokens = s.shape[-2], s.shape[-1]
            b = pyramid_budget(n_tokens, keep_ratio, layer, n_layers, self.window, self.beta, self.budget_rule)
            rows.append([min(max(1, b), n_tokens)] * n_heads)
        return torch.tensor(rows, dtype=torch.long)
