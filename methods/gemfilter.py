"""GemFilter (Shi et al., 2024, arXiv 2409.17422, "Discovering the Gems in Early Layers: Accelerating Long-Context
LLMs with 1000x Input Token Reduction"): an early layer's attention picks the tokens, then the whole prefill runs
again on those tokens alone.

Official code: SalesforceAIResearch/GemFilter @ 5f79b1a (``my_utils/my_generation.py``:
``my_greedy_generate_selection``; ``my_baseline/GemFilter/gem_filter_utils.py``: ``find_context`` /
``standard_dis_index``), the same code as ASL's GemFilter baseline (TANIGUCHIREI/ASL @ 9e1ec0c,
``baseline/gemfilter``).

1. **Filter pass** (``prefill_inputs``, run by ``harness.pipeline.prefill`` under its scoring hooks): the prompt
   goes through the decoder up to ``filter_layer``. There, the last prompt token's query (post-RoPE) scores every
   token by its raw inner product with the token's key, per query head (keys repeated over the GQA groups),
   **summed over the query heads**, smoothed by a 1-D average pool of ``kernel`` (5; zero padding counted):
   ``standard_dis_index(..., pool=True, sum_over_heads=True)``, no softmax and no scaling (a common factor moves no
   top-k). The top ``k = n_keep(T, keep_ratio)`` tokens, in prompt order, are selected (``gem_select``).
   The pass really stops there: ``score`` raises right after the selection, so neither the filter layer's
   attention output nor its MLP nor any deeper layer runs (the official code cuts the layer list to
   ``0 .. filter_layer`` and still computes that layer's unused attention and MLP; nothing read differs). It costs
   ``filter_layer`` layers plus one layer's q/k/v projections: about ``filter_layer / L`` of a prefill.
2. **Second prefill**: the selected tokens alone through the whole model at positions **0 .. k - 1**, renumbered
   as the official code does (``model(new_input_ids)`` with no ``position_ids``: transformers numbers them from
   the empty cache), so decoding continues at ``k`` (the official ``my_greedy_generate`` on that cache).
3. The kept cache is those ``k`` tokens in every layer and head; nothing else is evicted (every layer's score is
   None: kept whole). ``method.rerotate_keys`` is refused (the positions already are 0 .. k - 1).

As in the official code, the last prompt token is kept only if it scores among the top ``k`` (its own logits
then start decoding; otherwise those of the last selected token, as ``outputs.logits[:, -1]`` there). The
official selection protects no tokens (the config's selector keeps none); a ``method.selector.n_sink`` /
``n_recent`` given anyway is kept inside ``k`` (``harness.compress.select``).

Defaults: filter layer 13 of 32 (``needle_eval.py``'s choice for Llama-3.1-8B-Instruct, ASL's run scripts'
``filter_layer=13``), scaled to other depths as ``min(L - 1, round_half_up(13 / 32 * L))`` (2 on the 4-layer
reference model); kernel 5 (``standard_dis_index``'s default).

Rows record ``gemfilter_layer`` (the filter layer used) and ``gemfilter_selected`` (k). The selection time is part
of the prefill (``prefill_s``): the filter pass is GemFilter's prefill. ``kvbench.compress`` cannot run GemFilter:
it prunes the user's own forward, and GemFilter must prefill other tokens than the user's; it is refused in one
line (``kvbench.generate`` and the command run it).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from harness.compress import LayerInputs, Scorer, Selector, n_keep, register_scorer, select
from harness.errors import KvbenchError
from harness.schema import Count, NonNegative
from methods._attention import pool_scores
from methods._layerwise import scaled_layer

REF_LAYERS, REF_FILTER = 32, 13  # GemFilter needle_eval.py: select_layer_idx 13 for Llama-3.1-8B (32 layers)


def default_filter_layer(n_layers: int) -> int:
    return scaled_layer(REF_FILTER, REF_LAYERS, n_layers)


def gem_scores(last_query: Tensor, keys: Tensor, kernel: int) -> Tensor:
    """``[T]`` GemFilter scores: ``last_query [H_q, D]`` (the last prompt token's, post-RoPE) dotted with ``keys
    [H_kv, T, D]`` (query head h reads KV head h // G), summed over the query heads, average-pooled over positions
    by ``kernel`` (zero padding counted), in float32."""
    n_q, n_kv = last_query.shape[0], keys.shape[0]
    grouped = last_query.float().reshape(n_kv, n_q // n_kv, -1)
    per_head = torch.einsum("hgd,htd->hgt", grouped, keys.float())  # [H_kv, G, T]
    summed = per_head.sum(dim=(0, 1))  # [T]
    return pool_scores(summed[None, None], kernel, "avg")[0, 0]


def gem_select(scores: Tensor, k: int, n_sink: int = 0, n_recent: int = 0) -> Tensor:
    """The ``k`` best of ``[T]`` scores as ascending token indices (prompt order), the first ``n_sink`` and last
    ``n_recent`` tokens inside them (the selector's rule)."""
    k = max(1, min(k, scores.shape[-1]))
    return select(scores[None], torch.tensor([k]), n_sink, n_recent)[0]


class _FilterReached(Exception):
    """Raised from the filter layer's scoring to end the filter pass: nothing after the selection is needed."""


@register_scorer("gemfilter")
class GemFilterScorer(Scorer):
    shares_across_ratios = False  # the second prefill holds the ratio's k tokens
    supports_chunked_prefill = False
    supports_decoding = False  # its selection is its filter pass over the prompt
    renumbers_positions = True
    scores_every_layer = False  # every layer keeps the second prefill's k tokens, unscored

    def __init__(self, filter_layer: NonNegative | None = None, kernel: Count = 5):
        self.filter_layer = None if filter_layer is None else int(filter_layer)
        self.kernel = int(kernel)
        self.selector = Selector()
        self._phase: str | None = None  # None (no GemFilter prefill under way), "filter", "refill"
        self.n_layers = 0
        self.n_tokens = 0
        self.last_layer = -1
        self.last_selected: Tensor | None = None
        self.filter_seconds = 0.0  # wall time of the last filter pass (benchmarks/asl_prefill.py reads it)
        self._k = 0

    def bind_selector(self, selector: Selector) -> None:
        self.selector = selector

    def resolved(self, n_layers: int) -> int:
        """The filter layer for a model depth (a configured layer past the last one is the last one)."""
        return default_filter_layer(n_layers) if self.filter_layer is None else min(self.filter_layer, n_layers - 1)

    # ---- the filter pass ----------------------------------------------------------------------------------------
    def prefill_inputs(self, model: nn.Module, ids: list[int], keep_ratio: float) -> tuple[list[int], list[int]]:
        n_tokens = len(ids)
        self.n_layers = int(model.config.num_hidden_layers)
        self.n_tokens, self.last_layer = n_tokens, self.resolved(self.n_layers)
        self._k, self.last_selected = n_keep(n_tokens, keep_ratio, self.budget_rule), None
        device = model.device
        started = time.perf_counter()
        self._phase = "filter"
        try:
            # no cache: the filter pass keeps nothing; the decoder alone (no LM head: the pass never gets there)
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
            decoder(input_ids=torch.tensor([ids], device=device),
                    position_ids=torch.arange(n_tokens, device=device)[None], use_cache=False)
        except _FilterReached:
            pass
        finally:
            self._phase = "refill"
        if self.last_selected is None:
            raise KvbenchError(f"method gemfilter: the filter pass never reached layer {self.last_layer} "
                               "(its attention did not run through kvbench's hooks)")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.filter_seconds = time.perf_counter() - started
        chosen = self.last_selected.tolist()
        return [ids[i] for i in chosen], list(range(len(chosen)))

    def score(self, inputs: LayerInputs) -> Tensor | None:
        if self._phase is None:
            raise KvbenchError("method gemfilter prefills twice (its filter pass, then the tokens it selected), which "
                               "only harness.pipeline.prefill runs (kvbench.generate, the kvbench command); "
                               "kvbench.compress prunes your own forward and cannot")
        if self._phase == "filter" and inputs.layer_idx == self.last_layer:
            scores = gem_scores(inputs.queries[0, :, -1], inputs.keys[0], self.kernel)
            self.last_selected = gem_select(scores, self._k, self.selector.n_sink, self.selector.n_recent)
            raise _FilterReached
        return None  # the filter pass's earlier layers and the whole second prefill: every layer kept whole

    @contextmanager
    def prefill_patch(self, model: nn.Module, keep_ratio: float):
        try:
            yield self
        finally:
            self._phase = None  # a later forward outside harness.pipeline.prefill is refused again

    # ---- facts for the rows -------------------------------------------------------------------------------------
    def prefill_kept(self) -> list[Tensor | None] | None:
        """Every layer holds the selected tokens: their prompt indices ``[1, k]`` (evidence retention reads them)."""
        if self.last_selected is None:
            return None
        return [self.last_selected[None].cpu()] * self.n_layers

    def row_extras(self) -> dict[str, Any]:
        """``gemfilter_layer``: the filter layer whose attention selected; ``gemfilter_selected``: tokens selected
        (= tokens the second prefill ran on and every layer caches)."""
        selected = self.n_tokens if self.last_selected is None else int(self.last_selected.numel())
        return {"gemfilter_layer": self.last_layer, "gemfilter_selected": selected}
