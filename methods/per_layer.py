"""Per-layer keep ratios (allocator ``per_layer``): kvpress's PerLayerCompressionPress as configuration, on any scorer
(``method.allocator=per_layer method.allocator.keep_ratios=[1.0,0.5,0.25]``).

Layer ``l`` keeps ``n_keep(T, keep_ratios[l])`` entries per KV head (the method's budget rule: kvpress's
``int(T * (1 - cr_l))`` under a kvpress preset; kvpress's ``compression_ratios`` are ``1 - keep_ratios``). Two
readings of the run's ``keep_ratio``:

* ``relative: false`` (default, kvpress's): the list is the budget, the run's keep ratio is not used (kvpress's
  press refuses to be given one); the rows' ``kv_bytes`` say what was kept. Every run ratio keeps the same.
* ``relative: true``: the list is a profile, layer ``l`` keeps ``min(1, keep * r_l / mean(r))`` of its tokens, so
  the run's keep ratio is the mean over layers (up to the clip at 1) and a sweep over ratios keeps its meaning.

``keep_ratios: null`` (the default) keeps the run's ratio in every layer (the uniform allocator). The list must
have one entry per model layer (checked against the model before the run).
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from harness.compress import Allocator, n_keep, register_allocator
from harness.errors import KvbenchError
from harness.schema import Flag, KeepRatio


@register_allocator("per_layer")
class PerLayerAllocator(Allocator):
    per_layer_budgets = True

    def __init__(self, keep_ratios: Annotated[list[KeepRatio], Field(min_length=1)] | None = None,
                 relative: Flag = False):
        self.keep_ratios = None if keep_ratios is None else [float(r) for r in keep_ratios]
        self.relative = bool(relative)

    def bind_model(self, model) -> None:
        n_layers = int(model.config.num_hidden_layers)
        if self.keep_ratios is not None and len(self.keep_ratios) != n_layers:
            raise KvbenchError(f"method.allocator.keep_ratios has {len(self.keep_ratios)} entries; the model has "
                               f"{n_layers} layers (one keep ratio per layer)")

    def layer_ratios(self, n_layers: int, keep_ratio: float) -> list[float]:
        if self.keep_ratios is None:
            return [keep_ratio] * n_layers
        if len(self.keep_ratios) != n_layers:
            raise KvbenchError(f"method.allocator.keep_ratios has {len(self.keep_ratios)} entries for {n_layers} "
                               "scored layers (one keep ratio per layer)")
        if not self.relative:
            return list(self.keep_ratios)
        mean = sum(self.keep_ratios) / n_layers
        return [min(1.0, keep_ratio * r / mean) for r in self.keep_ratios]

    def budgets(self, scores: list[torch.Tensor], keep_ratio: float) -> torch.Tensor:
        ratios = self.layer_ratios(len(scores), keep_ratio)
        return torch.stack([torch.full((s.shape[0],), n_keep(s.shape[-1], r, self.budget_rule), dtype=torch.long)
                            for s, r in zip(scores, ratios)])
