"""CapKV ("Rethinking KV Cache Eviction via a Unified Information-Theoretic Objective", arXiv:2604.25975; kvpress
0.5.5's ``CapPress``): keep the entries that add the most information capacity to the cache, measured by
query-weighted statistical leverage of the values.

Under a linear-Gaussian surrogate of attention, the capacity of a kept set is ``log det(I + sum_i w_i u_i u_i^T)``;
its log-determinant is approximated per entry by the leverage score ``s_i = w_i u_i^T A^{-1} u_i`` with
``A = I + sum_i w_i u_i u_i^T`` over the candidate entries. Per layer and query head, as kvpress:

1. Query anchor ``mu``: the mean of the pre-RoPE prefill queries after the ``n_sink`` first (we receive post-RoPE
   queries and un-rotate them, as methods/expected_attention.py), rotated by RoPE averaged over the next
   ``n_future_positions`` positions ``T .. T+n-1`` (kvpress: not in the paper, but needed to compare a query
   anchor with post-RoPE keys).
2. Relevance ``w_i = exp(tau * (c_i - max_j c_j))``, ``c_i = cos(k_i, mu)`` clamped to [-1, 1] (kvpress normalises
   keys and anchor for stability where the paper uses raw dot products; the max shift avoids overflow).
3. Output directions ``u_i = v_i`` (raw values); ``A = I + sum_i (w_i + epsilon) v_i v_i^T`` (head_dim square,
   float32), ``s_i = w_i v_i^T A^{-1} v_i`` by a linear solve.
4. Averaged over the query heads of each KV head; the sinks get ``max + 1`` (always kept).

Defaults are kvpress's (tau 5, 512 future positions, 4 sinks, epsilon 1e-6), which kvpress's note ties to the
paper's results; ``method.preset=kvpress`` only switches the counts to kvpress's. The scorer's ``n_sink`` follows
the selector's (conf/method/scorer/cap.yaml).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer
from harness.errors import KvbenchError
from harness.schema import Count, NonNegative, NonNegativeFloat
from methods._attention import per_kv_head
from methods.expected_attention import average_rotation, unrotate


def capacity_scores(keys: Tensor, values: Tensor, anchor: Tensor, tau: float, epsilon: float) -> Tensor:
    """Steps 2-4 (before the sinks' padding): ``[B, H_kv, N]`` from keys / values ``[B, H_kv, N, d]`` and the rotated
    anchor per query head ``[B, H_q, d]``."""
    n_kv = keys.shape[1]
    group = anchor.shape[1] // n_kv
    k = keys.float().repeat_interleave(group, dim=1)  # [B, H_q, N, d] (repeat_kv layout)
    v = values.float().repeat_interleave(group, dim=1)
    cos = torch.einsum("bhd,bhnd->bhn", F.normalize(anchor.float(), dim=-1), F.normalize(k, dim=-1)).clamp(-1, 1)
    logits = tau * cos
    weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    scaled = v * torch.sqrt(weights + epsilon)[..., None]
    d = v.shape[-1]
    capacity = torch.eye(d, device=v.device) + torch.einsum("bhnd,bhne->bhde", scaled, scaled)
    solved = torch.linalg.solve(capacity, v.transpose(2, 3))  # A^{-1} v_i, [B, H_q, d, N]
    leverage = (v.transpose(2, 3) * solved).sum(dim=2)
    return per_kv_head(weights * leverage, n_kv)


@register_scorer("cap")
class CapScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts
    supports_decoding = False  # scores with every prefill query over its keys (one query per cached entry)

    def __init__(self, tau: NonNegativeFloat = 5.0, n_future_positions: Count = 512, n_sink: NonNegative = 4,
                 epsilon: NonNegativeFloat = 1e-6):
        self.tau = float(tau)
        self.n_future_positions = int(n_future_positions)
        self.n_sink = int(n_sink)
        self.epsilon = float(epsilon)

    def score(self, inputs: LayerInputs) -> Tensor:
        if inputs.rotary is None:
            raise KvbenchError("cap needs the model's rotary embedding (model.model.rotary_emb)")
        queries, keys, values = inputs.queries, inputs.keys, inputs.values
        batch, n_kv, n_tokens, _ = keys.shape
        if n_tokens <= self.n_sink:  # nothing but sinks: every entry is kept alike (kvpress refuses the prompt)
            return torch.zeros(batch, n_kv, n_tokens, device=keys.device)
        device = keys.device
        # 1. pre-RoPE query anchor (queries sit at positions 0..T-1: one prefill into an empty cache)
        pos = torch.arange(self.n_sink, n_tokens, device=device)[None]
        cos, sin = inputs.rotary(queries, pos)
        pre = unrotate(queries[:, :, self.n_sink:].float(), cos[:, None].float(), sin[:, None].float())
        future = torch.arange(n_tokens, n_tokens + self.n_future_positions, device=device)[None]
        cos_f, sin_f = inputs.rotary(pre, future)
        rotation = average_rotation(cos_f[0].float(), sin_f[0].float())
        anchor = (pre @ rotation.T).mean(dim=2)  # kvpress rotates every query, then averages: the same, linear
        # 2-4. capacity leverage of the entries after the sinks
        scores = capacity_scores(keys[:, :, self.n_sink:], values[:, :, self.n_sink:], anchor, self.tau, self.epsilon)
        if self.n_sink > 0:
            scores = F.pad(scores, (self.n_sink, 0), value=float(scores.max()) + 1.0)
        return scores
