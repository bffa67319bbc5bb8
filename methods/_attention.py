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


def attention_column_sums(queries: Tensor, keys: Tensor, scaling: float, chunk_elems: int = 1 << 26,
                          row_lse: Tensor | None = None) -> Tensor:
    """Sum over every query of the attention it gives each key: ``[B, H_q, T]`` (float32), in chunks.

    A whole causal prefill on CPU (as many queries as keys) takes the fast path, ``_prefill_column_sums``;
    a chunk's or a decoding step's queries (fewer than the keys) the plain one. ``row_lse``: each query row's
    log-sum-exp when the prefill's attention already computed it (``LayerInputs.row_lse``)."""
    batch, n_q, q_len, _ = queries.shape
    n_tokens = keys.shape[2]
    if q_len == n_tokens and queries.device.type == "cpu" and q_len > 1:
        return _prefill_column_sums(queries, keys, scaling, row_lse=row_lse)
    chunk = max(1, chunk_elems // max(1, batch * n_q * n_tokens))
    total = torch.zeros(batch, n_q, n_tokens, device=keys.device)
    offset = n_tokens - q_len
    for start in range(0, q_len, chunk):
        probs = attention_probs(queries[:, :, start : start + chunk], keys, scaling, offset + start)
        total += probs.sum(dim=2)
    return total


def _prefill_column_sums(queries: Tensor, keys: Tensor, scaling: float, chunk_elems: int = 1 << 23,
                         row_lse: Tensor | None = None) -> Tensor:
    """``attention_column_sums`` of a causal prefill in about 2.3x the cost of its attention instead of 12-15x (CPU,
    the reference model's shapes, 8k-16k tokens; benchmarks/h2o_scoring.py): each query row's log-sum-exp comes
    from one fused flash-attention pass, so the probabilities are ``exp(q . k * scale - lse)`` in one more pass
    (no row max, no normalising pass: the ``- lse`` is a last channel of the matmul, a ones channel on the keys),
    and a chunk of queries is multiplied only with the keys it sees (the causal triangle, half the work).
    ``chunk_elems`` bounds a chunk's logits (32 MB in float32: small enough to stay in cache, which is faster than
    larger chunks here)."""
    batch, n_q, n_tokens, dim = queries.shape
    n_kv = keys.shape[1]
    group = n_q // n_kv
    q, k = queries.float(), keys.float()
    lse = row_lse.float() if row_lse is not None else None
    if lse is None:
        expanded = k.repeat_interleave(group, dim=1)
        lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, expanded, expanded, 0.0, True, scale=scaling)[1]  # [B, H_q, T]
    q_aug = torch.cat([q * scaling, -lse[..., None]], dim=-1).reshape(batch, n_kv, group, n_tokens, dim + 1)
    k_aug = torch.cat([k, k.new_ones(*k.shape[:3], 1)], dim=-1)[:, :, None]
    total = torch.zeros(batch, n_kv, group, n_tokens, device=keys.device)
    chunk = max(1, chunk_elems // max(1, batch * n_q * n_tokens))
    for start in range(0, n_tokens, chunk):
        end = min(n_tokens, start + chunk)
        logits = q_aug[:, :, :, start:end] @ k_aug[..., :end, :].transpose(-1, -2)  # [B, H_kv, G, c, end]
        # causal: the query at start + i sees keys <= start + i; only the chunk's own block has hidden entries
        logits[..., start:end].masked_fill_(
            torch.ones(end - start, end - start, dtype=torch.bool, device=keys.device).triu(1), float("-inf"))
        total[..., :end] += logits.exp_().sum(dim=3)
    return total.reshape(batch, n_q, n_tokens)


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
