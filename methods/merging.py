"""Merge-on-evict by key similarity (kvpress 0.5.5's ``MergingPress``, after Token Merging, Bolya et al., ICLR 2023,
arXiv:2210.09461, and D2O, Wan et al., 2024, arXiv:2406.13035): each evicted entry's value is blended into the kept
entry of the same head whose key is most cosine-similar; keys are kept as they are (RoPE positions stay right).

Per KV head, after a base scorer and the selector chose the kept entries (any scorer, wrapped:
``method.scorer.base=<scorer>``):

1. For each evicted entry ``e``: its target ``t(e)`` = argmax over kept ``j`` of ``cos(k_e, k_j)``, ``s_e`` that cosine.
2. It merges if ``s_e >= similarity_threshold`` and, with ``merge_fraction < 1``, if ``s_e`` is at least the
   ``1 - merge_fraction`` quantile of the merging candidates' similarities (the others count as ``-inf``).
3. Its weight ``w_e = max(s_e, 0) * |v_e| / (|v_e| + |v_t(e)| + 1e-6)`` (value norms): a large value pulls more.
4. Every kept ``j`` that received something becomes ``(v_j + sum_e w_e v_e) / (1 + sum_e w_e)``; the cache then keeps
   only the kept entries (``kv_bytes`` is the kept count).

No paper proposes exactly this (kvpress marks it an automated agent's contribution), so its defaults are kvpress's
(threshold 0, fraction 1) and ``method.preset=kvpress`` only switches the counts. kvpress wraps a ``ScorerPress``
the user passes; here the base is a scorer node (StreamingLLM by default, as ``cam``).
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from harness.compress import KVPRESS_COUNTS_ONLY, WrappedScorer, register_scorer
from harness.schema import Fraction
from methods._merge import evicted_of, heads_of

EPS = 1e-6  # kvpress's: safe for float16 and bfloat16
MergeFraction = Annotated[float, Field(gt=0.0, le=1.0)]  # (0, 1]: the share of candidates that merge


def similarity_merge(keys: Tensor, values: Tensor, kept: Tensor, threshold: float, fraction: float) -> Tensor:
    """One head's kept values after the merge (steps 1-4 of the module docstring): ``keys``, ``values`` ``[T, D]``,
    ``kept`` ``[b]``; returns ``[b, D]`` in ``values``' dtype, computed in float32."""
    kept_values = values[kept]
    evicted = evicted_of(kept, keys.shape[0])
    if evicted.numel() == 0 or kept.numel() == 0:
        return kept_values
    unit = lambda k: k / k.norm(dim=-1, keepdim=True).clamp(min=EPS)
    similarity, target = (unit(keys[evicted].float()) @ unit(keys[kept].float()).T).max(dim=-1)
    merges = similarity >= threshold
    if fraction < 1.0 and bool(merges.any()):
        cut = similarity.masked_fill(~merges, float("-inf")).quantile(1.0 - fraction)
        merges = merges & (similarity >= cut)
    evict_norm = values[evicted].float().norm(dim=-1)
    weights = similarity.clamp(min=0) * merges.float()
    weights = weights * evict_norm / (evict_norm + kept_values.float().norm(dim=-1)[target] + EPS)
    added = torch.zeros(kept.numel(), values.shape[-1], dtype=torch.float32, device=values.device)
    added.index_add_(0, target, weights[:, None] * values[evicted].float())
    total = torch.zeros(kept.numel(), dtype=torch.float32, device=values.device).index_add_(0, target, weights)
    blended = ((kept_values.float() + added) / (1.0 + total)[:, None]).to(values.dtype)
    return torch.where((total > 0)[:, None], blended, kept_values)


@register_scorer("merging")
class SimilarityMergingScorer(WrappedScorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts

    def __init__(self, base="streaming_llm", similarity_threshold: Fraction = 0.0,
                 merge_fraction: MergeFraction = 1.0):
        super().__init__(base)
        self.similarity_threshold = float(similarity_threshold)
        self.merge_fraction = float(merge_fraction)

    def merge(self, layer_idx: int, keys: Tensor, values: Tensor, kept: Tensor | list[Tensor]
              ) -> tuple[Tensor, Tensor]:
        merged = values.clone()  # the prefill cache is shared by every keep ratio: never written into
        for head, idx in enumerate(heads_of(kept)):
            idx = idx.to(values.device)
            merged[0, head, idx] = similarity_merge(keys[0, head], values[0, head], idx, self.similarity_threshold,
                                                    self.merge_fraction)
        return keys, merged
