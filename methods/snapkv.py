"""SnapKV (Li et al., 2024): the attention of the last ``window`` queries (the observation window) onto each
token, averaged over the window, pooled along the sequence to keep neighbouring tokens together, and
averaged over the query heads of each GQA group. The window itself is always kept (``n_recent`` = window).

Defaults follow the official implementation (window 32, kernel 7, max-pool); ``method.preset=kvpress``
switches to kvpress's SnapKVPress (window 64, kernel 5, avg-pool).
"""
import torch
import torch.nn.functional as F

from typing import Literal

from harness.compress import KVPRESS_BUDGET, LayerInputs, Scorer, register_scorer
from harness.schema import Count
from methods._attention import attention_probs, per_kv_head, pool_scores


def snap_scores(inputs: LayerInputs, window: int, kernel: int, pool: str, probs: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Window attention onto the tokens before the window, pooled; the window's own entries score 0 here and
    are kept by the selector (``n_recent`` = window), as both the official code and kvpress force them in.
    ``probs``: that window attention when the caller already computed it (``attention_probs`` of the last
    ``min(window, T)`` queries)."""
    n_tokens = inputs.keys.shape[2]
    # the window is the last queries there are: a chunked prefill's chunk may be shorter than the window
    window = min(window, n_tokens, inputs.queries.shape[2])
    n_prefix = n_tokens - window
    batch, n_kv = inputs.keys.shape[:2]
    if n_prefix == 0:
        return torch.zeros(batch, n_kv, n_tokens, device=inputs.keys.device)
    # Softmax over all keys (window included in the normalisation), then only the prefix columns.
    if probs is None:
        probs = attention_probs(inputs.queries[:, :, -window:], inputs.keys, inputs.scaling, n_prefix)
    scores = probs[..., :n_prefix].mean(dim=2)  # [B, H_q, T - window]
    scores = pool_scores(scores, kernel, pool)  # over the prefix only, like both references
    scores = per_kv_head(scores, n_kv)
    return F.pad(scores, (0, window), value=0.0)


@register_scorer("snapkv")
class SnapKVScorer(Scorer):
    PRESETS = {"kvpress": {"scorer": {"window": 64, "kernel": 5, "pool": "avg"}, "selector": {"n_recent": 64},
                           **KVPRESS_BUDGET}}

    def __init__(self, window: Count = 32, kernel: Count = 7, pool: Literal["max", "avg"] = "max"):
        self.window, self.kernel, self.pool = int(window), int(kernel), pool

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return snap_scores(inputs, self.window, self.kernel, self.pool)
