"""SimLayerKV ("SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction", Zhang et al.,
arXiv:2410.13846): whole layers are "lazy" when their last queries look only at the first and the most recent
tokens; a lazy layer keeps its ``n_initial`` first and ``recent - n_last`` last entries, the others everything
(kvpress's ``n_recent`` is our ``recent``: ``n_recent`` is the selector's key in kvbench).

* **Laziness** of a layer (scorer ``simlayerkv``): the attention of its last ``n_last`` queries (after RoPE,
  causal, softmax over every key), averaged over batch, query heads and those queries, with the ``n_last``
  window's own columns dropped (as kvpress's ``SnapKVPress.compute_window_attention``); laziness = its mass on
  the first ``n_initial`` plus the last ``recent`` of the remaining columns. Within a lazy layer the order is
  positional: the first ``n_initial`` tokens, then the most recent.
* **Which layers** (allocator ``simlayerkv``): ``rule=threshold`` (the paper's rule; kvpress's
  ``SimLayerKVPress``, set by ``method.preset=kvpress``): a layer is lazy when its laziness exceeds
  ``lazy_threshold`` (default 1.0, kvpress's: nothing is lazy; the paper recommends 0.9 for Llama 3, 0.65 Llama 2,
  0.8 Mistral, 0.85 Qwen) and the prompt is longer than ``n_initial + recent + n_last``; the keep ratio is
  ignored and the memory is whatever that keeps. ``rule=budget`` (our default): the keep ratio decides, as for
  every method here:
  layers turn lazy from the laziest down until the cache holds the uniform total ``sum_l H * n_keep(T_l, r)``,
  the last one keeping a longer recent window so that the total is exact, and when every layer is lazy and that
  is still too much, their windows shrink alike (StreamingLLM in every layer).
* Defaults ``n_last=1`` (the paper's decoding-time variant, which kvpress implements), ``n_initial=4``,
  ``recent=1024``: kvpress's, which are the paper's.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from harness.compress import (KVPRESS_BUDGET, Allocator, LayerInputs, Scorer, n_keep, register_allocator,
                              register_scorer, round_to_total)
from harness.errors import KvbenchError
from harness.schema import Count, Fraction, NonNegative
from methods._attention import attention_probs


def laziness(inputs: LayerInputs, n_last: int, n_initial: int, recent: int) -> float:
    """Attention mass of the last ``n_last`` queries on the first ``n_initial`` and last ``recent`` keys before
    them (mean over batch, query heads and the window)."""
    n_tokens = inputs.keys.shape[2]
    window = min(n_last, n_tokens)
    probs = attention_probs(inputs.queries[:, :, -window:], inputs.keys, inputs.keys.shape[-1] ** -0.5,
                            n_tokens - window)
    attn = probs[..., : n_tokens - window].mean(dim=(0, 1, 2))  # [T - n_last]
    return float(attn[:n_initial].sum() + attn[-recent:].sum()) if attn.numel() else 1.0


@register_scorer("simlayerkv")
class SimLayerKVScorer(Scorer):
    """The per-layer laziness at prefill; token scores in a lazy layer's order (initial tokens, then recency)."""

    PRESETS = {"kvpress": {"allocator": {"rule": "threshold"}, **KVPRESS_BUDGET}}

    def __init__(self, n_last: Count = 1, n_initial: NonNegative = 4, recent: Count = 1024):
        self.n_last, self.n_initial, self.recent = int(n_last), int(n_initial), int(recent)
        self.laziness: dict[int, float] = {}

    def begin_prefill(self, ids: list[int], n_question: int) -> None:
        self.laziness = {}

    def score(self, inputs: LayerInputs) -> Tensor:
        self.laziness[inputs.layer_idx] = laziness(inputs, self.n_last, self.n_initial, self.recent)
        batch, n_kv, n_tokens, _ = inputs.keys.shape
        order = torch.arange(n_tokens, device=inputs.keys.device, dtype=torch.float32)
        order[: min(self.n_initial, n_tokens)] += n_tokens  # the initial tokens above every recent one
        return order.expand(batch, n_kv, n_tokens)

    def row_extras(self) -> dict[str, Any]:
        return {"simlayerkv_laziness": [round(self.laziness[i], 6) for i in sorted(self.laziness)]}


def simlayer_budgets(lazy: list[float], n_tokens: list[int], n_heads: int, keep_ratio: float, window: int,
                     threshold: float | None, min_len: int, rule: str = "floor") -> Tensor:
    """Budgets ``[L, H]``: lazy layers ``min(T, window)`` per head, the others ``T``. ``threshold``: lazy iff
    laziness > threshold and ``T > min_len`` (nothing at threshold 1.0, as kvpress). None: the laziest layers
    first until the uniform total fits (see the module docstring)."""
    sizes = torch.tensor(n_tokens, dtype=torch.long)
    budgets = sizes.clone()
    windows = sizes.clamp(max=window)
    if threshold is not None:
        for layer, (score, t) in enumerate(zip(lazy, n_tokens)):
            if threshold < 1.0 and t > min_len and score > threshold:
                budgets[layer] = windows[layer]
        return budgets[:, None].expand(-1, n_heads).clone()
    target = sum(n_keep(t, keep_ratio, rule) for t in n_tokens)  # per head; every head of a layer alike
    total = int(budgets.sum())
    order = sorted(range(len(lazy)), key=lambda i: (-lazy[i], i))  # laziest first, ties to the lower layer
    for layer in order:
        if total <= target:
            break
        take = min(int(sizes[layer] - windows[layer]), total - target)
        budgets[layer] -= take
        total -= take
    if total > target:  # every layer lazy and still too much: shrink the windows alike
        budgets = round_to_total(windows.double() * (target / float(windows.sum())), target, 1, windows)
    return budgets[:, None].expand(-1, n_heads).clone()


@register_allocator("simlayerkv")
class SimLayerKVAllocator(Allocator):
    per_layer_budgets = True  # lazy layers keep a window, the others everything

    def __init__(self, rule: Literal["budget", "threshold"] = "budget", lazy_threshold: Fraction = 1.0):
        self.rule, self.lazy_threshold = rule, float(lazy_threshold)
        self.scorer: SimLayerKVScorer | None = None

    def bind_scorer(self, scorer: Scorer | None) -> None:
        if not isinstance(scorer, SimLayerKVScorer):
            name = scorer.registered_name if scorer is not None else None
            raise KvbenchError(f"method.allocator=simlayerkv reads the layer laziness the simlayerkv scorer measures; "
                               f"method.scorer={name!r} does not (use method.scorer=simlayerkv)")
        self.scorer = scorer

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:
        s = self.scorer
        lazy = [s.laziness[i] for i in sorted(s.laziness)]
        if len(lazy) != len(scores):
            raise KvbenchError(f"method=simlayerkv: {len(lazy)} layers measured, {len(scores)} scored")
        return simlayer_budgets(lazy, [int(x.shape[-1]) for x in scores], scores[0].shape[-2], keep_ratio,
                                s.n_initial + s.recent - s.n_last,
                                self.lazy_threshold if self.rule == "threshold" else None,
                                s.n_initial + s.recent + s.n_last, self.budget_rule)
