"""Attention probabilities recomputed from captured queries and keys, for scorers that need them, and the
reductions scorers apply to them (GQA groups, 1-D pooling).

sdpa returns no attention weights and eager materialises all of them at once; scorers need only some
rows (SnapKV's window, TOVA's last query) or column sums (H2O), computed here in query chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_probs(queries: Tensor, keys: Tensor, scaling: float, q_start: int) -> Tensor:
    """Softmax attention ``[B, H_q, Lq, T]`` in float32 of queries at positions ``q_start..`` over all keys,
    causal (key j visible to the query at position p iff j <= p). GQA: query head h uses KV head h // G."""
    batch, n_q, q_len, dim = queries.shape
    n_kv, n_tokens = keys.shape[1], keys.shape[2]
    group = n_q // n_kv
    q = queries.float().reshape(batch, n_kv, group, q_len, dim)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", q, keys.float()) * scaling
    q_pos = torch.arange(q_start, q_start + q_len, device=keys.device)[:, None]
    visible = torch.arange(n_tokens, device=keys.device)[None, :] <= q_pos
    logits = logits.masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1).reshape(batch, n_q, q_len, n_tokens)


def attention_column_sums(queries: Tensor, keys: Tensor, scaling: float, chunk_elems: int = 1 << 26) -> Tensor:
    """Sum over every query of the attention it gives each key: ``[B, H_q, T]`` (float32), in chunks."""
    batch, n_q, q_len, _ = queries.shape
    n_tokens = keys.shape[2]
    chunk = max(1, chunk_elems // max(1, batch * n_q * n_tokens))
    total = torch.zeros(batch, n_q, n_tokens, device=keys.device)
    offset = n_tokens - q_len
    for start in range(0, q_len, chunk):
        probs = attention_probs(queries[:, :, start : start + chunk], keys, scaling, offset + start)
        total += probs.sum(dim=2)
    return total


def per_kv_head(scores: Tensor, n_kv: int, reduce: str = "mean") -> Tensor:
    """``[B, H_q, T]`` query-head scores to ``[B, H_kv, T]`` by averaging (or summing) each GQA group."""
    batch, n_q, n_tokens = scores.shape
    grouped = scores.reshape(batch, n_kv, n_q // n_kv, n_tokens)
    return grouped.mean(dim=2) if reduce == "mean" else grouped.sum(dim=2)


def pool_scores(scores: Tensor, kernel: int, pool: str) -> Tensor:
    """``[B, H, T]`` scores smoothed along the sequence by a 1-D pool of ``kernel`` (stride 1, same length for
    an odd kernel): ``max`` (-inf padding) or ``avg`` (zero padding counted, as AvgPool1D's default), as SnapKV's
    official code and kvpress pool. A kernel of 1 (or no tokens) leaves them as they are."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    pad = kernel // 2
    if pool == "max":
        return F.max_pool1d(scores, kernel, stride=1, padding=pad)
    return F.avg_pool1d(scores, kernel, stride=1, padding=pad)
