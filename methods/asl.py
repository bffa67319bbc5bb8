"""ASL, Adaptive Selection Layer (Taniguchi et al., ACL Findings 2026, arXiv 2601.07667): training-free
layer-wise token pruning where the layer of the one-shot token selection is chosen per prompt.

Per layer during prefill (``score`` is called from the attention function with that layer's post-RoPE
queries and keys):

* token scores: the softmax attention of the last ``window`` queries (the observation window) onto the
  tokens before the window ("past-only"), summed over the window queries, smoothed by a 1-D **average** pool
  of ``kernel`` (7) over those tokens (zero padding counted, ``AvgPool1D``'s default), and **summed over all
  query heads** (one score per token: the selection drops hidden states, so it cannot differ per head).
  Average pooling and the head sum follow the paper's description (SnapKV's official code max-pools;
  ``pool: max`` is available). The method description is from secondary summaries of the paper (the PDF and
  code were not available here), so thresholds may need re-checking against the authors' code;
* ranks: 0 = most attended, over the ``T - window`` context tokens;
* from ``start_layer`` on, ``V(l)`` = mean over the top-``k`` tokens of layer ``l`` (``k = budget - window``)
  of the variance (population) of each token's rank over layers ``l - lookback + 1 .. l``; the ratio
  ``V(l) / V(start_layer)`` is 1 at the start layer, and the first layer ``l >= start_layer`` where it is
  below ``threshold`` is the selection layer (``choose_layer`` is that rule as a pure function; the prefill
  applies it incrementally, layer by layer, with the same code).

At the selection layer ``l`` the kept tokens are the top-``k`` context tokens by that layer's scores plus the
last ``window`` tokens (``budget = n_keep(T, keep_ratio)`` in all), in original order. Layer ``l``'s cache is
cut to them at once, and a forward pre-hook on every deeper decoder layer (installed by ``prefill_patch``, the
machinery ASL shares with FastKV and PyramidInfer: ``methods._layerwise``) shortens ``hidden_states``,
``position_embeddings`` (cos, sin), ``position_ids`` and any attention mask to them, so deeper layers compute and
cache only the kept tokens, with their original positions (RoPE). The
selection layer itself computes attention for the kept tokens only (``query_rows``; its keys and values, and so
the kept tokens' outputs, are those of the whole prompt): the other rows would be dropped unread.
The last prompt token is always kept (it is in the window), so ``logits_to_keep=1`` still gives its logits.

Layers before ``l`` keep their full cache (``early_layers: full``) or get SnapKV at the same budget
(``early_layers: snapkv``, the default, as the paper pairs ASL with SnapKV for decoding). If no layer
qualifies, every layer gets SnapKV (``asl_layer = -1``). ``fixed_layer`` forces the selection at one layer
(fixed-layer one-shot selection, as FastKV / GemFilter, for ablations and tests).

Defaults: window 32, kernel 7, threshold 0.3, start layer 10 and lookback 8 on 32-layer models, scaled
for other depths as ``round_half_up(10 / 32 * n_layers)`` and ``max(2, round_half_up(8 / 32 * n_layers))``.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from harness.compress import LayerInputs, n_keep, register_scorer
from harness.errors import KvbenchError
from harness.schema import Count, NonNegative, NonNegativeFloat
from methods._layerwise import LayerwisePrefill, LayerwiseScorer, round_half_up, scaled_layer, window_token_scores
from methods.snapkv import snap_scores

REF_LAYERS, REF_START, REF_LOOKBACK = 32, 10, 8


_round_half_up = round_half_up  # the name methods.gemfilter imported before methods._layerwise held it


def default_start(n_layers: int) -> int:
    return scaled_layer(REF_START, REF_LAYERS, n_layers)


def default_lookback(n_layers: int) -> int:
    return max(2, round_half_up(REF_LOOKBACK / REF_LAYERS * n_layers))


def ranks_of(scores: Tensor) -> Tensor:
    """Rank of every token (0 = highest score; ties broken by position), float32."""
    order = scores.argsort(descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks.float()


def rank_variance(rank_history: list[Tensor | None], layer: int, lookback: int, k: int) -> float:
    """``V(layer)``: mean over the top-``k`` tokens of ``layer`` (rank < k) of the population variance of each
    token's rank over layers ``layer - lookback + 1 .. layer`` (clipped at layer 0)."""
    first = max(0, layer - lookback + 1)
    window = torch.stack([rank_history[i] for i in range(first, layer + 1)])  # [n, T_ctx]
    top = rank_history[layer] < k
    if not bool(top.any()):
        return 0.0
    return float(window[:, top].var(dim=0, unbiased=False).mean())


def variance_ratio(v: float, v_start: float) -> float:
    if v_start > 0:
        return v / v_start
    return 1.0 if v == v_start else math.inf  # a start layer with no variance: only a threshold > 1 selects


def choose_layer(rank_history: list[Tensor | None], start: int, lookback: int, threshold: float, k: int) -> int:
    """The selection layer by ASL's rule, or -1 when no layer qualifies.

    ``rank_history[l]`` is the rank (0 = most attended) of every context token at layer ``l`` (entries before
    ``start - lookback + 1`` may be None). The first ``l >= start`` with ``V(l) / V(start) < threshold``.
    """
    v_start = None
    for layer in range(start, len(rank_history)):
        v = rank_variance(rank_history, layer, lookback, k)
        if v_start is None:
            v_start = v
        if variance_ratio(v, v_start) < threshold:
            return layer
    return -1


@register_scorer("asl")
class ASLScorer(LayerwiseScorer):
    shares_across_ratios = False  # the prefill itself depends on the budget

    def __init__(self, window: Count = 32, kernel: Count = 7, pool: Literal["max", "avg"] = "avg",
                 threshold: NonNegativeFloat = 0.3, start_layer: NonNegative | None = None, lookback: Count | None = None,
                 early_layers: Literal["full", "snapkv"] = "snapkv", snapkv_kernel: Count = 7,
                 snapkv_pool: Literal["max", "avg"] = "max", fixed_layer: NonNegative | None = None):
        self.window, self.kernel, self.pool = int(window), int(kernel), pool
        self.threshold = float(threshold)
        self.start_layer = None if start_layer is None else int(start_layer)
        self.lookback = None if lookback is None else int(lookback)
        self.early_layers = early_layers
        self.snapkv_kernel, self.snapkv_pool = int(snapkv_kernel), snapkv_pool
        self.fixed_layer = None if fixed_layer is None else int(fixed_layer)
        self.layerwise = LayerwisePrefill("asl")
        self._reset(1.0)

    @property
    def _active(self) -> bool:
        return self.layerwise.active

    @property
    def _cache(self):
        return self.layerwise.cache

    # ---- per-prefill state -------------------------------------------------------------------------------
    def _reset(self, keep_ratio: float) -> None:
        self.keep_ratio = keep_ratio
        self.n_tokens = 0
        self.n_layers = 0
        self.budget = 0
        self.rank_history: list[Tensor | None] = []
        self.ratios: dict[int, float] = {}
        self._v_start: float | None = None
        self.last_selection_layer = -1
        self.last_selected: Tensor | None = None  # kept token indices (original positions), sorted

    def resolved(self, n_layers: int) -> tuple[int, int]:
        """(start layer, lookback) for a model depth."""
        start = default_start(n_layers) if self.start_layer is None else min(self.start_layer, n_layers - 1)
        lookback = default_lookback(n_layers) if self.lookback is None else self.lookback
        return start, lookback

    def split(self, n_tokens: int) -> tuple[int, int]:
        """(k, n_window): top-k context tokens + the last n_window tokens = the budget."""
        n_window = min(self.window, n_tokens, self.budget)
        return self.budget - n_window, n_window

    # ---- scoring, called from the attention function of every layer ---------------------------------------
    def score(self, inputs: LayerInputs) -> Tensor | None:
        layer = inputs.layer_idx
        if not self._active:
            raise KvbenchError("method asl needs its prefill_patch (harness.pipeline.prefill enters it)")
        if self.last_selected is not None:
            return None  # a layer at or after the selection: already holds only the kept tokens
        self.n_layers = inputs.n_layers
        n_tokens = inputs.keys.shape[2]
        if self.budget == 0:
            self.n_tokens, self.budget = n_tokens, n_keep(n_tokens, self.keep_ratio, self.budget_rule)
            self.rank_history = [None] * inputs.n_layers
        start, lookback = self.resolved(inputs.n_layers)
        k, n_window = self.split(n_tokens)
        forced = self.fixed_layer is not None
        probs = None
        if (layer >= start - lookback + 1 and not forced) or layer == self.fixed_layer:
            token_scores, probs = window_token_scores(inputs, self.window, self.kernel, self.pool)  # [T_ctx]
            self.rank_history[layer] = ranks_of(token_scores)
            selected = False
            if forced:
                selected = layer == self.fixed_layer
            elif layer >= start:
                v = rank_variance(self.rank_history, layer, lookback, k)
                if self._v_start is None:
                    self._v_start = v
                self.ratios[layer] = variance_ratio(v, self._v_start)
                selected = self.ratios[layer] < self.threshold
            if selected:
                self._select(inputs, token_scores, k, n_window)
                return None
        # SnapKV scores for the layers before the selection (or every layer when none qualifies): exactly the
        # snapkv scorer's, from the same window attention when the ranks computed it (same window).
        return snap_scores(inputs, self.window, self.snapkv_kernel, self.snapkv_pool, probs)

    def _select(self, inputs: LayerInputs, token_scores: Tensor, k: int, n_window: int) -> None:
        layer, n_tokens = inputs.layer_idx, self.n_tokens
        device = inputs.keys.device
        top = token_scores.topk(k).indices if k > 0 else torch.zeros(0, dtype=torch.long, device=device)
        recent = torch.arange(n_tokens - n_window, n_tokens, device=device)
        idx = torch.cat([top.sort().values, recent])
        self.last_selection_layer, self.last_selected = layer, idx
        # Deeper layers process only the selected tokens; this layer's cache keeps only them (its attention, still
        # to run, reads the whole prompt's keys).
        self.layerwise.propagate(layer, idx)
        self.layerwise.cut_cache(layer, idx)

    def finish_prefill(self, scores: list[Tensor | None]) -> list[Tensor | None]:
        """With ``early_layers=full``, the layers before a selection stay whole: they returned SnapKV scores in
        case no layer would qualify."""
        if self.early_layers == "full" and self.last_selected is not None:
            return [None] * self.last_selection_layer + list(scores[self.last_selection_layer:])
        return scores

    # ---- facts for the rows (query_rows and the prefill patch: LayerwiseScorer's) -------------------------
    def prefill_kept(self) -> list[Tensor | None]:
        """``[1, S]`` cuts, shared by all heads, after a selection; nothing cut when no layer qualified."""
        if self.last_selected is None:
            return [None] * self.n_layers
        return super().prefill_kept()

    def row_extras(self) -> dict[str, Any]:
        """``asl_layer``: the selection layer (-1: none qualified, SnapKV everywhere); ``asl_kept_tokens``: tokens
        the deeper layers processed (the prompt length when none); ``asl_skipped``: fraction of all
        decoder layers' (layer, token) work that the shortened deeper layers skip, an estimate of the prefill saved
        (not counting the selection layer's own attention rows, also skipped); ``asl_min_ratio``: the
        smallest variance ratio seen after the start layer (null when none was computed), i.e. how far the prompt
        was from selecting when no layer qualified."""
        layer, n, n_layers = self.last_selection_layer, self.n_tokens, max(1, self.n_layers)
        kept = n if self.last_selected is None else int(self.last_selected.numel())
        deeper = 0 if layer < 0 else n_layers - 1 - layer
        skipped = deeper * (n - kept) / (n_layers * n) if n else 0.0
        start = min(self.ratios, default=None)  # ratios start at the start layer, where the ratio is 1 by definition
        later = [r for lay, r in self.ratios.items() if lay != start and math.isfinite(r)]
        min_ratio = round(min(later), 6) if later else None
        return {"asl_layer": layer, "asl_kept_tokens": kept, "asl_skipped": round(skipped, 6),
                "asl_min_ratio": min_ratio}
