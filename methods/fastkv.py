"""FastKV (Jo, Song, Kim, Kim, 2025, arXiv 2502.01068): Token-Selective Propagation (TSP) at one fixed layer, and
SnapKV-style compressed caches, decoupling the prefill's saving (the TSP length) from the KV budget.

Official code: dongwonjo/FastKV @ b9787691 (``baselines/fastkv/utils.py``: ``FastKVCluster.update_kv``,
``compress_fastkv``; ``baselines/fastkv/llama_model.py``: the decoder layer that gathers the hidden states and the
model loop that re-reads RoPE at the kept positions); ASL's FastKV baseline (TANIGUCHIREI/ASL @ 9e1ec0c, the ASL
code with ``default_select_layer`` fixed, ``baseline/asl/customized_cache.py``) does the same. Per prefill layer:

* **layers before the TSP layer** see the whole prompt; each caches SnapKV at the budget ``B = n_keep(T, keep)``:
  per KV head, the top-``(B - window)`` tokens by the softmax attention of the last ``window`` queries, pooled
  by ``kernel`` (``pool``), summed over each GQA group, plus the window itself (``methods.snapkv.snap_scores``;
  the selector keeps the window, ``n_recent`` = window).
* **the TSP layer** also caches SnapKV at ``B`` (both official codes: ``past_key_value.update`` gets the
  compressed keys), computes its attention over the whole prompt, and then only the TSP tokens go on: the
  top-``(n_tsp - window)`` tokens by the same pooled window attention **summed over all heads** (one set for every
  head: a dropped token is one hidden state; ``attn_cache.sum(dim=-2)``), plus the window, in prompt order
  (``methods._layerwise.window_token_scores``). Only their attention rows are computed there (``query_rows``;
  the official layer computes the others and drops them after its MLP: nothing read differs).
* **deeper layers** compute and cache only the TSP tokens, at their original positions (``methods._layerwise``:
  the pre-hooks shorten hidden states, RoPE, positions, masks). Their caches are SnapKV at ``B`` among the TSP
  tokens when ``n_tsp > B`` (the official ``retain_rate / tsp_rate`` of the propagated length), cut during the
  prefill by the method's selector; otherwise they keep every TSP token.

``n_tsp = n_keep(T, tsp_ratio)``; ``tsp_ratio: null`` (the default) propagates the budget itself, ``n_tsp = B``,
as ASL's scripts run FastKV (``select_k = KV_Budget = 2048``); FastKV's own scripts use ``tsp_rate 0.2`` with a
``retain_rate 0.1`` budget (``method.scorer.tsp_ratio=0.2``). No propagation when ``T <= n_tsp`` (official
``q_len > tsp_length``): every layer is SnapKV then.

Defaults are the official code's: TSP layer 15 of 32 (``scripts/eval_*.sh`` for Llama-3.1-8B), scaled to other
depths as ``min(L - 1, round_half_up(15 / 32 * L))``, which gives the official scripts' own choices for the other
models too (17 of Ministral-8B's 36 layers, 19 of Mistral-Nemo's 40: ``scripts2/eval_prefill.sh``); window 8,
kernel 7, max-pooling (``eval/run_*.py``'s argparse defaults, which the scripts do not override; FastKVCluster's
own default ``avgpool`` is replaced by them). ASL's comparison runs FastKV with window 32, avg-pool
(``method.scorer.window=32 method.scorer.pool=avg method.selector.n_recent=32``).

Rows record ``fastkv_layer`` (the TSP layer, -1 when nothing was dropped), ``fastkv_tsp_tokens`` (tokens the
deeper layers processed) and ``fastkv_kept_by_layer`` (each layer's cache size with the config's uniform allocator).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from harness.compress import LayerInputs, Selector, n_keep, register_scorer
from harness.errors import KvbenchError
from harness.schema import Count, KeepRatio, NonNegative
from methods._layerwise import LayerwisePrefill, LayerwiseScorer, scaled_layer, window_token_scores
from methods.snapkv import snap_scores

REF_LAYERS, REF_TSP = 32, 15  # dongwonjo/FastKV scripts/eval_ruler.sh: tsp_idx=15 for Llama-3.1-8B-Instruct


def default_tsp_layer(n_layers: int) -> int:
    return scaled_layer(REF_TSP, REF_LAYERS, n_layers)


def tsp_tokens(token_scores: Tensor, n_tokens: int, n_tsp: int, window: int) -> Tensor:
    """The ``n_tsp`` propagated tokens of a ``n_tokens`` prompt, ascending: the last ``w = min(window, n_tsp)``
    tokens and the top-``(n_tsp - w)`` of ``token_scores`` (one per token before the observation window)."""
    w = min(window, n_tsp)
    top = token_scores.topk(n_tsp - w).indices.sort().values
    recent = torch.arange(n_tokens - w, n_tokens, device=token_scores.device)
    return torch.cat([top, recent])


@register_scorer("fastkv")
class FastKVScorer(LayerwiseScorer):
    shares_across_ratios = False  # the prefill itself depends on the budget (and on n_tsp)

    def __init__(self, tsp_layer: NonNegative | None = None, tsp_ratio: KeepRatio | None = None, window: Count = 8,
                 kernel: Count = 7, pool: Literal["max", "avg"] = "max"):
        self.tsp_layer = None if tsp_layer is None else int(tsp_layer)
        self.tsp_ratio = None if tsp_ratio is None else float(tsp_ratio)
        self.window, self.kernel, self.pool = int(window), int(kernel), pool
        self.selector = Selector()
        self.layerwise = LayerwisePrefill("fastkv")
        self._reset(1.0)

    def varies_layer_counts(self, keep_ratio: float) -> bool:
        # layers from the TSP layer on hold the propagated tokens: fewer than the budget when tsp_ratio is below it
        return self.tsp_ratio is not None and self.tsp_ratio < keep_ratio

    def bind_selector(self, selector: Selector) -> None:
        self.selector = selector  # deeper layers are cut during the prefill by the same rule as the others

    def _reset(self, keep_ratio: float) -> None:
        self.keep_ratio = keep_ratio
        self.n_tokens = self.n_layers = self.budget = self.n_tsp = 0
        self.last_tsp_layer = -1  # where tokens were dropped (-1: nowhere)

    def resolved_layer(self, n_layers: int) -> int:
        return default_tsp_layer(n_layers) if self.tsp_layer is None else min(self.tsp_layer, n_layers - 1)

    def score(self, inputs: LayerInputs) -> Tensor | None:
        if not self.layerwise.active:
            raise KvbenchError("method fastkv needs its prefill_patch (harness.pipeline.prefill enters it)")
        layer = inputs.layer_idx
        if layer == 0:
            self.n_layers, self.n_tokens = inputs.n_layers, inputs.keys.shape[2]
            self.budget = n_keep(self.n_tokens, self.keep_ratio, self.budget_rule)
            self.n_tsp = n_keep(self.n_tokens, self.keep_ratio if self.tsp_ratio is None else self.tsp_ratio,
                                self.budget_rule)
        tsp = self.resolved_layer(inputs.n_layers)
        if layer < tsp or (layer == tsp and self.n_tokens <= self.n_tsp):
            return snap_scores(inputs, self.window, self.kernel, self.pool)
        if layer == tsp:
            token_scores, probs = window_token_scores(inputs, self.window, self.kernel, self.pool)
            self.layerwise.propagate(layer, tsp_tokens(token_scores, self.n_tokens, self.n_tsp, self.window))
            self.last_tsp_layer = layer
            return snap_scores(inputs, self.window, self.kernel, self.pool, probs)
        if self.last_tsp_layer < 0:
            return snap_scores(inputs, self.window, self.kernel, self.pool)
        held = inputs.keys.shape[2]
        if held > self.budget:  # SnapKV at the budget among the TSP tokens, cut now (the allocator counts T)
            scores = snap_scores(inputs, self.window, self.kernel, self.pool)[0]
            kept = self.selector.select(scores, torch.full((scores.shape[0],), self.budget))
            self.layerwise.cut_cache(layer, self.layerwise.layer_tokens(layer)[kept])
        return None

    def row_extras(self) -> dict[str, Any]:
        tsp, n = self.last_tsp_layer, self.n_tokens
        deeper = self.n_tsp if tsp >= 0 else n
        kept = [min(n, self.budget) if tsp < 0 or layer <= tsp else min(deeper, self.budget)
                for layer in range(self.n_layers)]
        return {"fastkv_layer": tsp, "fastkv_tsp_tokens": deeper, "fastkv_kept_by_layer": kept}
