"""CurDKV ("Value-Guided KV Compression for LLMs via Approximated CUR Decomposition", arXiv:2509.15038):
attention-free. CUR decomposition keeps the rows of a matrix with the largest leverage scores; CurDKV
approximates a token's leverage in its KV head by its squared norm, for keys (``k2 = ||k||^2``, post-RoPE, as
cached) and values (``v2 = ||v||^2``):

1. optionally (``use_random_leverage``) keys and values are first projected by one Gaussian matrix ``G``
   (``head_dim x sketch_dimension``, entries ``N(0, 1 / sketch_dimension)``, drawn from the layer's generator);
2. with ``use_local_approximation`` each score is divided by the sum of its window of ``local_window_size``
   tokens (leverage relative to the neighbourhood instead of the whole sequence);
3. ``leverage_type`` combines them: ``key`` (k2), ``value`` (v2), ``kv_avg`` ((k2 + v2) / 2) or ``kv_product``
   (k2 * v2), normalised to sum to 1 over the sequence;
4. the sinks are the selector's ``n_sink`` (CurDKV and kvpress set the first 4 tokens' scores to 1).

Defaults are the CurDKV code's (its kvpress-based ``CURPress``: kv_product, no random projection, local windows
of 16, 4 sinks), which differ from kvpress 0.5.5's ``CURPress`` in one place: the CurDKV code pads the sequence
on the left, so the windows end at the last token (``window_align: end``; a partial window is the first
tokens'), where kvpress pads on the right, so they start at token 0 (``window_align: start``; the partial window
is the most recent tokens'). ``method.preset=kvpress`` sets ``start`` and kvpress's counts. Both compute in
float32 here (kvpress in the cache's dtype, the CurDKV code in float32).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.compress import KVPRESS_BUDGET, LayerInputs, Scorer, register_scorer
from harness.schema import Count


def local_share(scores: Tensor, window: int, align: str) -> Tensor:
    """``[B, H, T]`` scores divided by the sum of their window of ``window`` tokens; zero padding completes the
    partial window, at the start (``align = end``: windows end at the last token) or at the end (``start``)."""
    n_tokens = scores.shape[-1]
    pad = (window - n_tokens % window) % window
    padded = F.pad(scores, (pad, 0) if align == "end" else (0, pad))
    blocks = padded.reshape(*scores.shape[:-1], -1, window)
    shares = (blocks / blocks.sum(dim=-1, keepdim=True)).flatten(-2)
    return shares[..., pad:] if align == "end" else shares[..., :n_tokens]


@register_scorer("cur")
class CURScorer(Scorer):
    PRESETS = {"kvpress": {"scorer": {"window_align": "start"}, **KVPRESS_BUDGET}}

    def __init__(self, leverage_type: Literal["key", "value", "kv_avg", "kv_product"] = "kv_product",
                 use_random_leverage: bool = False, sketch_dimension: Count = 20,
                 use_local_approximation: bool = True, local_window_size: Count = 16,
                 window_align: Literal["end", "start"] = "end"):
        self.leverage_type = leverage_type
        self.use_random_leverage = bool(use_random_leverage)
        self.sketch_dimension = int(sketch_dimension)
        self.use_local_approximation = bool(use_local_approximation)
        self.local_window_size = int(local_window_size)
        self.window_align = window_align

    def score(self, inputs: LayerInputs) -> Tensor:
        keys, values = inputs.keys.float(), inputs.values.float()
        if self.use_random_leverage:  # one projection for keys and values, as both references
            dim = keys.shape[-1]
            sketch = torch.randn(dim, self.sketch_dimension, generator=inputs.generator) / math.sqrt(self.sketch_dimension)
            sketch = sketch.to(keys.device)
            keys, values = keys @ sketch, values @ sketch
        k2, v2 = keys.pow(2).sum(dim=-1), values.pow(2).sum(dim=-1)
        if self.use_local_approximation:
            k2 = local_share(k2, self.local_window_size, self.window_align)
            v2 = local_share(v2, self.local_window_size, self.window_align)
        combined = {"key": lambda: k2, "value": lambda: v2, "kv_avg": lambda: (k2 + v2) / 2,
                    "kv_product": lambda: k2 * v2}[self.leverage_type]()
        return combined / combined.sum(dim=-1, keepdim=True)
