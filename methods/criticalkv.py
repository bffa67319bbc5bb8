"""CriticalKV (Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective",
arXiv:2502.03805): a correction of any scorer by what an entry's value does to the attention output.

The attention output's perturbation when an entry is evicted is bounded by its attention weight times
``||v W_o||_1`` (the entry's value through the output projection of its head). Two-stage selection per KV head of
budget ``b``:

1. the first ``n1 = max(1, int(b * first_stage_ratio))`` entries by the base score (the base's own ranking keeps
   what it is surest about);
2. the other ``b - n1`` by ``(base score + epsilon) * ||v W_o||_1`` (mean over the query heads of the GQA group).

A wrapper (``scorer: {name: criticalkv, base: snapkv}``): any scorer is the base (``method.scorer.base=tova``,
``method.scorer.base.window=16``). The base's scores are what the allocator sees (AdaKV's head budgets come from
them, as in kvpress's CriticalAdaKVPress); the two stages are the declared budget-dependent step
``Scorer.rerank``, so one prefill still serves every ratio (``score`` keeps each layer's ``||v W_o||_1``).

Protected tokens (the selector's sinks and recent window) rank first in stage 1 (they reach ``rerank`` at +inf)
and are always kept. kvpress's SnapKV pads its window with ``max + 1`` instead: where stage 1 is smaller than the
window, kvpress fills stage 1 with an arbitrary (tie-broken) part of the window and ranks the rest of the window by
``(max + 1 + epsilon) * ||v W_o||_1`` in stage 2, where a window entry can in principle lose to a prefix entry;
ours keeps the whole window then. ``safeguard`` (critical_adakv: AdaKV's ``alpha``) keeps each head's top
``max(1, int(alpha * mean budget))`` base entries in stage 1 too: kvpress's CriticalAdaKVPress sets them to the
float maximum before stage 1 and its stage 2 multiplies that maximum, so they are kept whatever stage 2 says.

Defaults: epsilon 1e-4, first-stage ratio 0.5 (the paper's code, as kvpress, whose press the first author reviewed),
so ``method.preset=kvpress`` only switches the counts, and sets the base's own kvpress values (SnapKV: window 64,
kernel 5, avg-pool, ``n_recent`` 64). Stage 1 is ``int(b * ratio)`` of the head's budget ``b``; kvpress's
CriticalKVPress counts ``int(T * (1 - cr) * ratio)`` from the ratio, the same number for ratio 1/2 (and every
1/n: ``floor(floor(x) / n) = floor(x / n)``), at most one entry apart otherwise.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, WrappedScorer, register_scorer
from harness.schema import Fraction, NonNegativeFloat


def output_norms(values: Tensor, module: nn.Module, chunk_elems: int = 1 << 24, kv_head: int | None = None) -> Tensor:
    """``||v W_o^h||_1`` per KV head and token, ``[B, H_kv, T]`` (float32): each query head's slice of the output
    projection applied to its KV head's values, the L1 norm over the hidden size, averaged over the GQA group.
    Computed in token chunks so that ``T x hidden`` is never held for all heads at once. ``kv_head``: ``values``
    hold that one KV head of the layer (a ragged layer scored head by head, ``LayerInputs.kv_head``)."""
    batch, n_kv, n_tokens, dim = values.shape
    weight = module.o_proj.weight.float()  # [hidden, H_q * D]
    hidden, n_q = weight.shape[0], weight.shape[1] // dim
    group = n_q // (n_kv if kv_head is None else int(module.config.num_key_value_heads))
    per_head = weight.t().reshape(n_q, dim, hidden)  # W_o^h: [D, hidden] for query head h
    out = torch.zeros(batch, n_kv, n_tokens, device=values.device)
    step = max(1, chunk_elems // max(1, batch * hidden))
    v = values.float()
    heads = range(n_q) if kv_head is None else range(kv_head * group, (kv_head + 1) * group)
    for q in heads:
        kv = q // group - (0 if kv_head is None else kv_head)
        for start in range(0, n_tokens, step):
            block = v[:, kv, start : start + step] @ per_head[q]  # [B, t, hidden]
            out[:, kv, start : start + step] += block.abs().sum(dim=-1)
    return out / group


def stage_one_count(budget: int, first_stage_ratio: float) -> int:
    """Entries of a head's budget chosen by the base score: ``max(1, int(b * ratio))`` (none at ratio 0)."""
    if first_stage_ratio <= 0 or budget <= 0:
        return 0
    return min(budget, max(1, int(budget * first_stage_ratio)))


def two_stage_scores(scores: Tensor, norms: Tensor, budgets: Tensor, epsilon: float, first_stage_ratio: float,
                     safeguard: float = 0.0) -> Tensor:
    """The scores ``[H, T]`` whose top-``budget`` per head is CriticalKV's selection: each head's stage-1 entries
    (its top by ``scores``; at least the top ``max(1, int(safeguard * mean budget))`` with a safeguard) and the
    protected entries (+inf in ``scores``) at +inf, every other entry ``(score + epsilon) * norm``."""
    forced = torch.isposinf(scores)
    second = (scores.float() + epsilon) * norms.float()
    second = torch.nan_to_num(second, nan=-math.inf, posinf=math.inf)  # 0 * inf: an entry with no value norm
    second = second.masked_fill(forced, math.inf)
    n_heads = scores.shape[0]
    mean_budget = int(budgets.sum()) // n_heads  # AdaKV's budgets sum to H * n_kept exactly
    n_safe = max(1, int(mean_budget * safeguard)) if safeguard > 0 else 0
    for head in range(n_heads):
        budget = int(budgets[head])
        n_first = min(budget, max(stage_one_count(budget, first_stage_ratio), n_safe))
        if n_first > 0:
            second[head, scores[head].topk(n_first).indices] = math.inf
    return second


@register_scorer("criticalkv")
class CriticalKVScorer(WrappedScorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress's; the base's own preset is applied to the base

    def __init__(self, base="snapkv", epsilon: NonNegativeFloat = 1e-4, first_stage_ratio: Fraction = 0.5,
                 safeguard: Fraction = 0.0):
        super().__init__(base)
        self.epsilon, self.first_stage_ratio, self.safeguard = float(epsilon), float(first_stage_ratio), float(safeguard)
        self._norms: dict[int, Tensor] = {}  # per layer, from the last prefill's score(): ||v W_o||_1 [H_kv, T]

    def decode_score(self, inputs: LayerInputs) -> Tensor:
        # the norms ``rerank`` reads must be the cache's at hand, not the prefill's
        return self.score(inputs, self.base.decode_score)

    def score(self, inputs: LayerInputs, base_score=None) -> Tensor | None:
        scores = (base_score or self.base.score)(inputs)
        if scores is None:
            self._norms.pop(inputs.layer_idx, None)
            return None
        self._norms[inputs.layer_idx] = output_norms(inputs.values, inputs.module, kv_head=inputs.kv_head)[0]
        return scores

    def rerank(self, layer_idx: int, scores: Tensor, budgets: Tensor) -> Tensor:
        scores = self.base.rerank(layer_idx, scores, budgets)
        norms = self._norms[layer_idx].to(scores.device)
        return two_stage_scores(scores, norms, budgets, self.epsilon, self.first_stage_ratio, self.safeguard)
