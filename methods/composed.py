"""Composition of two scorers (scorer ``composed``): kvpress's ComposedPress as configuration, ``scorer: {name:
composed, base: <first scorer>, second: <second scorer>, first_keep: 0.5}``.

kvpress chains presses: the first prunes the cache, the second scores what is left and prunes again. Here, per
layer and KV head:

1. the first scorer (``base``) scores the whole prefill; its top ``n_keep(T, first_keep)`` entries (the selector's
   protected tokens first) are what the first press would leave;
2. the second scorer scores those entries alone: its ``LayerInputs`` hold the kept keys and values (in position
   order), and the whole prefill's queries (and hidden states), as kvpress's second press receives them;
3. the method's budget is then taken from those entries by the second score (everything else scores -inf).

So the second stage sees the cache the first one leaves, as in kvpress (an attention-based second scorer, SnapKV,
normalises over the kept keys only), and one prefill still serves every ratio (``first_keep`` is fixed; the run's
keep ratio is the final one, at most ``first_keep``: a larger budget is cut to the first stage's entries).
kvpress's final count is ``int(int(T * k1) * k2)`` for the two presses' keep ratios; ours is the method's budget rule
on the final keep ratio (one entry apart at most). The second scorer may only score (its prefill hooks -- a
changed prefill, decode patches, merging -- are not run; the first scorer's are, as any wrapper's base).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from harness.compress import LayerInputs, Scorer, Selector, WrappedScorer, n_keep, register_scorer
from harness.schema import KeepRatio


@register_scorer("composed")
class ComposedScorer(WrappedScorer):
    SCORER_PARAMS = ("base", "second")

    # its second stage reranks the base's prefill cut (``rerank``); decoding would score with the base alone
    supports_decoding = False

    def __init__(self, base="snapkv", second="knorm", first_keep: KeepRatio = 0.5):
        super().__init__(base)
        self.second = second
        self.first_keep = float(first_keep)
        self.selector = Selector()
        self._kept: dict[int, Tensor] = {}  # per layer, the first stage's entries [H, n_first]

    @property
    def needs_hidden_states(self) -> bool:  # type: ignore[override]
        return self.base.needs_hidden_states or self.second.needs_hidden_states

    @property
    def shares_across_ratios(self) -> bool:  # type: ignore[override]
        return self.base.shares_across_ratios and self.second.shares_across_ratios

    @property
    def supports_chunked_prefill(self) -> bool:  # type: ignore[override]
        return self.base.supports_chunked_prefill and self.second.supports_chunked_prefill

    @property
    def budget_rule(self) -> str:  # type: ignore[override]
        return self.base.budget_rule

    @budget_rule.setter
    def budget_rule(self, rule: str) -> None:
        self.base.budget_rule = rule
        self.second.budget_rule = rule

    @property
    def label(self) -> str:
        name = lambda s: s.label if isinstance(s, WrappedScorer) else s.registered_name  # noqa: E731
        return f"{self.registered_name}({name(self.base)},{name(self.second)})"

    def bind_model(self, model: nn.Module) -> None:
        self.base.bind_model(model)
        self.second.bind_model(model)

    def input_files(self) -> dict[str, Path]:
        second = {key.replace("method.scorer.", "method.scorer.second.", 1): path
                  for key, path in self.second.input_files().items()}
        return {**super().input_files(), **second}

    def begin_prefill(self, ids: list[int], n_question: int) -> None:
        self.base.begin_prefill(ids, n_question)
        self.second.begin_prefill(ids, n_question)

    def bind_selector(self, selector: Selector) -> None:
        self.selector = selector
        self.base.bind_selector(selector)
        self.second.bind_selector(selector)

    def score(self, inputs: LayerInputs) -> Tensor | None:
        first = self.base.score(inputs)
        if first is None:
            return None
        n_tokens = first.shape[-1]
        n_first = n_keep(n_tokens, self.first_keep, self.budget_rule)
        kept = self.selector.protect(first.float()).topk(n_first, dim=-1).indices.sort(dim=-1).values  # [B, H, n]
        index = kept[..., None].expand(-1, -1, -1, inputs.keys.shape[-1])
        pruned = replace(inputs, keys=inputs.keys.gather(2, index), values=inputs.values.gather(2, index))
        second = self.second.score(pruned)
        if second is None:
            return None
        out = torch.full_like(first.float(), -math.inf)
        out.scatter_(-1, kept, second.float())
        return out  # the selector's protected tokens stay protected (+inf) whatever the second score says

    def rerank(self, layer_idx: int, scores: Tensor, budgets: Tensor) -> Tensor:
        # the scores are the second scorer's (on the first stage's entries): its budget-dependent step, if any
        return self.second.rerank(layer_idx, scores, budgets)
