"""Expected Attention (Devoto et al., 2025; kvpress's ``ExpectedAttentionPress``, 0.5.5): the attention future
queries are expected to pay each cached key, times the value's norm.

Per layer, as kvpress:

1. Query statistics, **before RoPE**, per query head: mean ``mu`` and (``use_covariance``) the biased covariance
   ``cov`` of the prefill queries at positions ``n_sink..T-1`` (kvpress: all prefilled tokens but the sinks;
   ``query_window=w`` uses only the last ``w`` queries instead). We receive post-RoPE queries, so they are
   un-rotated with the model's rotary module at their positions ``0..T-1`` (``q = R_p^T q_rot / a^2``, ``a`` the
   rotary's attention scaling; q_norm, where the family has it, is already applied, as in kvpress).
2. RoPE averaged over the next ``n_future_positions`` positions ``T..T+n-1``: ``R = mean_t R_t`` with
   ``R_t q = q cos_t + rotate_half(q) sin_t``; ``mu <- R mu``, ``cov <- R cov R^T``.
3. For the keys after the sinks (post-RoPE, as cached): ``s = k.mu / sqrt(d) + k^T cov k / (2 d)`` (the log of
   E[exp(q.k/sqrt d)] for Gaussian q), softmax over those positions, mean over the query heads of each KV
   head, then ``(s + epsilon) * ||v||`` if ``use_vnorm``.
4. The ``n_sink`` first tokens get ``max + 1`` (always kept, as kvpress's padding).

Defaults are kvpress 0.5.5's (n_future_positions 512, n_sink 4, covariance and value norm on, epsilon 0);
LU-KV uses epsilon 0.02. The scorer's ``n_sink`` matches the method config's selector ``n_sink: 4``
(``n_sink`` is a harness key and is not passed to scorers; see the note in conf/method/expected_attention.yaml).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer
from harness.errors import KvbenchError
from harness.schema import Count, NonNegative, NonNegativeFloat
from methods._attention import per_kv_head


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate(queries: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Pre-RoPE queries from post-RoPE ones: inverse of ``q cos + rotate_half(q) sin`` (cos, sin may carry the
    rotary's attention scaling ``a``: cos^2 + sin^2 = a^2)."""
    return (queries * cos - rotate_half(queries) * sin) / (cos * cos + sin * sin)


def average_rotation(cos: Tensor, sin: Tensor) -> Tensor:
    """``mean_t R_t`` (d x d) with ``R_t q = q cos_t + rotate_half(q) sin_t``, from ``cos, sin`` of shape [n, d]."""
    d = cos.shape[-1]
    half = d // 2
    eye = torch.eye(d, dtype=cos.dtype, device=cos.device)
    perm = torch.zeros(d, d, dtype=cos.dtype, device=cos.device)
    perm[half:, :half] = torch.eye(half, dtype=cos.dtype, device=cos.device)
    perm[:half, half:] = -torch.eye(half, dtype=cos.dtype, device=cos.device)
    return (cos[:, :, None] * eye + sin[:, :, None] * perm).mean(dim=0)


def query_statistics(pre_rope: Tensor, use_covariance: bool) -> tuple[Tensor, Tensor | None]:
    """Mean ``[B, H, d]`` and biased covariance ``[B, H, d, d]`` over positions of ``[B, H, N, d]`` queries."""
    mu = pre_rope.mean(dim=2)
    if not use_covariance:
        return mu, None
    centred = pre_rope - mu[:, :, None]
    return mu, torch.einsum("bhni,bhnj->bhij", centred, centred) / pre_rope.shape[2]


def expected_scores(keys: Tensor, values: Tensor, mu: Tensor, cov: Tensor | None, epsilon: float,
                    use_vnorm: bool) -> Tensor:
    """Steps 3 of the module docstring: ``[B, H_kv, N]`` from keys/values ``[B, H_kv, N, d]`` (sinks already cut)
    and rotated statistics per query head ``mu [B, H_q, d]``, ``cov [B, H_q, d, d]``."""
    batch, n_kv, n_tokens, d = keys.shape
    group = mu.shape[1] // n_kv
    k = keys.float().repeat_interleave(group, dim=1)  # [B, H_q, N, d] (repeat_kv layout)
    logits = torch.einsum("bhnd,bhd->bhn", k, mu) / math.sqrt(d)
    if cov is not None:
        logits = logits + ((k @ cov) * k).sum(dim=-1) / d / 2
    probs = per_kv_head(logits.softmax(dim=-1), n_kv)
    if use_vnorm:
        probs = (probs + epsilon) * values.float().norm(dim=-1)
    return probs


@register_scorer("expected_attention")
class ExpectedAttentionScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts

    def __init__(self, n_future_positions: Count = 512, n_sink: NonNegative = 4, use_covariance: bool = True,
                 use_vnorm: bool = True, epsilon: NonNegativeFloat = 0.0,
                 query_window: Count | None = None):
        self.n_future_positions = int(n_future_positions)
        self.n_sink = int(n_sink)
        self.use_covariance = bool(use_covariance)
        self.use_vnorm = bool(use_vnorm)
        self.epsilon = float(epsilon)
        self.query_window = None if query_window is None else int(query_window)

    def score(self, inputs: LayerInputs) -> Tensor:
        if inputs.rotary is None:
            raise KvbenchError("expected_attention needs the model's rotary embedding (model.model.rotary_emb)")
        queries, keys, values = inputs.queries, inputs.keys, inputs.values
        batch, n_kv, n_tokens, d = keys.shape
        n_sink = min(self.n_sink, n_tokens - 1)
        device = keys.device
        # 1. pre-RoPE query statistics over the queries after the sinks. One prefill: the queries are the cache's
        # T rows at positions 0..T-1; a chunked prefill's are its last rows, at positions query_start.. (the
        # cache before them holds the kept entries, so a key's index is not its position).
        q_len = queries.shape[2]
        first = max(0, n_sink - (n_tokens - q_len))
        if self.query_window is not None:
            first = max(first, q_len - self.query_window)
        pos = inputs.query_start + torch.arange(first, q_len, device=device)[None]
        cos, sin = inputs.rotary(queries, pos)  # [1, N, d]
        pre = unrotate(queries[:, :, first:].float(), cos[:, None].float(), sin[:, None].float())
        mu, cov = query_statistics(pre, self.use_covariance)
        # 2. average RoPE over the future positions
        next_pos = inputs.query_start + q_len
        future = torch.arange(next_pos, next_pos + self.n_future_positions, device=device)[None]
        cos_f, sin_f = inputs.rotary(mu, future)
        rot = average_rotation(cos_f[0].float(), sin_f[0].float())
        mu = mu @ rot.T
        if cov is not None:
            cov = rot @ cov @ rot.T
        # 3. expected attention over the keys after the sinks, times value norms
        scores = expected_scores(keys[:, :, n_sink:], values[:, :, n_sink:], mu, cov, self.epsilon, self.use_vnorm)
        # 4. sinks always kept
        if n_sink > 0:
            scores = torch.nn.functional.pad(scores, (n_sink, 0), value=float(scores.max()) + 1.0)
        return scores
