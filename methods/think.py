"""ThinK ("ThinK: Thinner Key Cache by Query-Driven Pruning", Xu et al., arXiv:2407.21118): prunes key
*channels* (dimensions), not tokens.

* **Channel importance** per KV head: ``mean_w(q_c^2) * mean_t(k_c^2)`` for channel ``c``, with the last ``window``
  queries (after RoPE; averaged over the query heads of the KV head's group) and every cached key (after RoPE).
  It ranks channels as the paper's ``||Q_w[:, c] K[:, c]^T||_F`` does (that norm is the product of the two
  column norms). The lowest channels are pruned from every cached key but the last ``recent`` ones, which stay
  whole (the official ThinK code's ``recent_size``, 32, as its query window).
* **Keep ratio = the share of key channels kept** per head, ``floor(head_dim * keep_ratio)`` (kvpress's
  preset: ``head_dim - int(head_dim * (1 - keep_ratio))``, its ``key_channel_compression_ratio = 1 - keep``).
  Tokens are all kept and values are untouched, so the cache holds
  ``kv_bytes / kv_bytes_full = (1 + s) / 2 + (1 - s) * recent / (2 T)`` for a kept share ``s`` of ``head_dim``
  (keys and values of equal width): 0.625 at ``s = 0.25`` without a recent window.
* **The cache really stores fewer key channels** (``harness.cache.ChannelLayer``): the pruned keys are
  ``[B, H_kv, T - recent, d]``; decoding scores them with the queries' same channels of that KV head
  (``harness.attention.channel_attention``), the recent window and every decoded token with all channels. The
  dot products are those of keys whose pruned channels are zero, which is what kvpress computes: it zeroes the
  channels in place (no memory saved) and keeps every prefill key pruned (``method.preset=kvpress``: ``recent=0``).
* GQA: the query statistics are averaged over the group, as kvpress (one set of channels per stored KV head).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from harness.compress import KVPRESS_BUDGET, KeyChannels, LayerInputs, Scorer, kept_fraction, register_scorer
from harness.schema import Count, NonNegative


def kept_channels(head_dim: int, keep_ratio: float, rule: str = "floor") -> int:
    """Key channels kept per head: ``floor(D * keep + 1e-6)`` (at least 1), or kvpress's ``D - int(D * cr)``
    with ``cr = 1 - keep`` in float (its ``n_pruned = int(head_dim * key_channel_compression_ratio)``)."""
    if rule == "kvpress":
        return head_dim - int(head_dim * (1.0 - kept_fraction(keep_ratio, rule)))
    return max(1, min(head_dim, int(head_dim * float(keep_ratio) + 1e-6)))


def channel_scores(queries: Tensor, keys: Tensor, window: int) -> Tensor:
    """``[B, H_kv, D]``: mean squared window query (averaged over each group) times mean squared key, per channel."""
    batch, n_q, _, dim = queries.shape
    n_kv = keys.shape[1]
    q = queries[:, :, -window:].float().pow(2).mean(dim=2)  # [B, H_q, D]
    q = q.view(batch, n_kv, n_q // n_kv, dim).mean(dim=2)
    return q * keys.float().pow(2).mean(dim=2)


@register_scorer("think")
class ThinKScorer(Scorer):
    """Channel scores per layer at prefill (no token is evicted: ``score`` returns None); ``key_channels`` cuts
    them at a ratio."""

    PRESETS = {"kvpress": {"scorer": {"recent": 0}, **KVPRESS_BUDGET}}
    supports_chunked_prefill = False  # channels are chosen once over the whole prefill
    supports_decoding = False  # it prunes key channels of the prefill, not tokens

    def __init__(self, window: Count = 32, recent: NonNegative = 32):
        self.window, self.recent = int(window), int(recent)
        self._scores: dict[int, Tensor] = {}

    def begin_prefill(self, ids: list[int], n_question: int) -> None:
        self._scores = {}

    def score(self, inputs: LayerInputs) -> None:
        self._scores[inputs.layer_idx] = channel_scores(inputs.queries, inputs.keys, self.window)[0].cpu()
        return None  # every token stays

    def key_channels(self, keep_ratio: float) -> list[KeyChannels | None]:
        out: list[KeyChannels | None] = []
        for layer in sorted(self._scores):
            scores = self._scores[layer]
            d = kept_channels(scores.shape[-1], keep_ratio, self.budget_rule)
            if d >= scores.shape[-1]:
                out.append(None)
                continue
            # the top-d channels; kvpress drops the bottom D - d, the same set unless two tie at the cut
            out.append(KeyChannels(scores.topk(d, dim=-1).indices.sort(dim=-1).values, self.recent))
        return out

    def row_extras(self) -> dict[str, Any]:
        return {"think_recent": self.recent}
