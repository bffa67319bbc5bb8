"""Leverage scores (the geometric half of Compactor: "Compactor: Calibrated Query-Agnostic KV Cache Compression
with Approximate Leverage Scores", Chari & Van Durme, arXiv:2507.08143): attention-free. A key that is an outlier
of its head's key geometry cannot be rebuilt from the others, so it is kept. Per layer and KV head:

1. the keys **before RoPE** (after k_norm where the family has it), ``X [T, d]``, centred over the sequence;
2. with ``sketch_dimension = k``: ``X <- X Phi``, ``Phi [d, k]`` Gaussian with entries ``N(0, 1/k)`` drawn from
   the layer's generator, one per head (the paper's right sketch); ``null``: no sketch (exact leverage);
3. the ridge leverage ``diag(X (X^T X + ridge I)^{-1} X^T)`` by a Cholesky solve (on failure the ridge grows to
   1e-2, then x10, at most 5 tries, as kvpress), clamped at 0;
4. z-scored over every head and token of the layer (one mean and std), so heads stay comparable for a
   cross-head allocator; top-k within a head is unchanged by it.

Defaults are kvpress 0.5.5's ``LeverageScorePress`` (contributed by the paper's first author: sketch 48, the
1e-2 Cholesky jitter); ``method.preset=kvpress`` only sets its counts. What cannot be kvpress's: the sketch's
draws. kvpress draws ``Phi`` from torch's global generator; ours come from the layer's generator (same
distribution, other numbers). Where ``k >= d`` the sketch enters the scores only through the ridge: with
``M = Phi Phi^T`` invertible, ``X Phi (Phi^T X^T X Phi + r I)^{-1} Phi^T X^T = X (X^T X + r M^{-1})^{-1} X^T``,
which at ``r = 0`` is the exact leverage, independent of ``Phi``. At ``k = d`` (a square Gaussian ``Phi``, badly
conditioned) ``r M^{-1}`` is large and the scores move with the draw (measured on the tiny conformance models:
kept sets change from one seed to the next in most layers, scores by up to 25%); at ``k = 3d``,
``M`` is near the identity and the scores are within 1e-3 of the exact ridge leverage (``sketch_dimension:
null``), kept sets identical on every fixture case. The conformance fixture (group ``leverage``) therefore
compares kvpress's default (48 > 16 = head_dim there) with ours both sketched and exact.

The official vLLM implementation (compactor-vllm) also computes the leverage per chunk of 512 tokens with a
5e-3 ridge and one ``Phi`` for all heads; not reproduced (kvbench's is the kvpress form the author contributed).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer
from harness.errors import KvbenchError
from harness.schema import Count, NonNegativeFloat
from methods.expected_attention import unrotate


def prerope_keys(inputs: LayerInputs, start: int = 0, stop: int | None = None) -> Tensor:
    """The cached keys of positions ``start..stop-1`` before RoPE, ``[B, H_kv, N, d]`` float32: the post-RoPE keys
    un-rotated at their positions (one prefill into an empty cache: position = index), which is kvpress's
    ``k_proj(hidden)`` (+ ``k_norm``) up to float rounding."""
    if inputs.rotary is None:
        raise KvbenchError(f"this scorer needs the model's rotary embedding (model.model.rotary_emb) to un-rotate keys")
    keys = inputs.keys[:, :, start:stop].float()
    positions = torch.arange(start, start + keys.shape[2], device=keys.device)[None]
    cos, sin = inputs.rotary(keys, positions)
    return unrotate(keys, cos[:, None].float(), sin[:, None].float())


def cholesky_with_jitter(gram: Tensor, ridge: float, tries: int = 5) -> Tensor:
    """Lower Cholesky factor of ``gram + ridge I``; where that fails, the ridge becomes 1e-2, then x10 (kvpress's
    schedule), at most ``tries`` times."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    current = float(ridge)
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(gram + current * eye)
        if bool((info == 0).all()):
            return factor
        current = max(1e-8, 1e-2 if current == 0.0 else 10.0 * current)
    raise KvbenchError(f"leverage scores: the key Gram matrix is not positive definite after {tries} ridge tries")


def leverage_scores(keys: Tensor, sketch: Tensor | None, ridge: float) -> Tensor:
    """Steps 1-3 of the module docstring: ``[B, H, N]`` ridge leverage of pre-RoPE ``keys [B, H, N, d]``,
    optionally right-sketched by ``sketch [B, H, d, k]``."""
    x = keys.to(torch.promote_types(keys.dtype, torch.float32))  # float32 at least (float64 stays)
    x = x - x.mean(dim=-2, keepdim=True)
    if sketch is not None:
        x = x @ sketch.to(x.dtype)
    xt = x.transpose(-2, -1)
    gram = xt @ x
    factor = cholesky_with_jitter(0.5 * (gram + gram.transpose(-2, -1)), ridge)
    solved = torch.cholesky_solve(xt, factor)  # (X^T X + r I)^{-1} X^T
    return (x * solved.transpose(-2, -1)).sum(dim=-1).clamp_min(0)


def layer_zscore(scores: Tensor) -> Tensor:
    """One mean and (unbiased) std over every head and token of the layer, std floored at 1e-6 (kvpress)."""
    return (scores - scores.mean()) / scores.std().clamp_min(1e-6)


def draw_sketch(inputs: LayerInputs, batch: int, n_heads: int, dim: int, k: int) -> Tensor:
    """Gaussian ``[B, H, d, k]`` with entries ``N(0, 1/k)``, from the layer's generator."""
    phi = torch.randn(batch, n_heads, dim, k, generator=inputs.generator) / math.sqrt(k)
    return phi.to(inputs.keys.device)


def sketched_leverage(inputs: LayerInputs, keys: Tensor, sketch_dimension: int | None, ridge: float) -> Tensor:
    """Leverage scores of pre-RoPE ``keys`` with this config's sketch (None: exact)."""
    batch, n_heads, _, dim = keys.shape
    sketch = None if sketch_dimension is None else draw_sketch(inputs, batch, n_heads, dim, sketch_dimension)
    return leverage_scores(keys, sketch, ridge)


@register_scorer("leverage")
class LeverageScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts

    def __init__(self, sketch_dimension: Count | None = 48, ridge: NonNegativeFloat = 1e-2):
        self.sketch_dimension = None if sketch_dimension is None else int(sketch_dimension)
        self.ridge = float(ridge)

    def score(self, inputs: LayerInputs) -> Tensor:
        return layer_zscore(sketched_leverage(inputs, prerope_keys(inputs), self.sketch_dimension, self.ridge))
