"""Compactor ("Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores", Chari &
Van Durme, arXiv:2507.08143): a blend of two query-agnostic signals per layer, computed on the tokens between
the ``sink_size_start`` first and the ``sink_size_end`` last ones (those are kept):

* geometry: the leverage scores of the pre-RoPE keys (``methods/leverage.py``: centred, Gaussian right sketch of
  ``sketch_dimension`` columns, ridge Cholesky solve), z-scored over the layer;
* non-causal chunked attention: the prompt is cut into chunks of ``chunk_size`` tokens; inside each chunk every
  (post-RoPE) query attends to every key of the chunk, without causal mask and **without** the 1/sqrt(d) scale;
  a key's score is the attention it receives summed over the chunk's queries, averaged over the query heads of
  its KV head, times its value norm, smoothed by an average pool of 3 (zero padding counted), z-scored over the
  layer;
* ``score = blending * leverage + attention``; ``blending: null`` uses the compression ratio ``1 - keep_ratio``
  (then the scores depend on the ratio: one prefill per ratio).

Defaults are kvpress 0.5.5's ``CompactorPress`` (contributed by the paper's first author: 8 + 4 kept, chunks of
256, sketch 48, blending = compression ratio); ``method.preset=kvpress`` only sets its counts. As kvpress, the
last chunk is zero-padded to ``chunk_size``: its padded keys get the logit -1e-9 (not -inf: the real queries
give them ~e^0 of their mass) and its padded queries attend uniformly, adding ~``pad / chunk_size`` to each real
key of that chunk; kept here so the kept sets are kvpress's. The sketch's draws come from the layer's generator,
not torch's global one (see methods/leverage.py for why the kept sets still agree where ``k >= head_dim``).

The official vLLM engine (compactor-vllm) differs: protected 16 first / 64 last tokens, chunks of 128, blending
0.5, a summed (not averaged) query group, no value norm or pooling, masked padding, leverage per 512-token chunk,
and one top-k over all heads of a layer jointly; kvbench follows the author's kvpress form.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer
from harness.errors import KvbenchError
from harness.schema import Count, NonNegative, NonNegativeFloat
from methods._attention import per_kv_head, pool_scores
from methods.leverage import layer_zscore, prerope_keys, sketched_leverage


def non_causal_chunk_attention(queries: Tensor, keys: Tensor, chunk_size: int) -> Tensor:
    """``[B, H_q, S]``: per key, the unscaled softmax attention summed over the queries of its chunk (queries
    ``[B, H_q, S, d]``, keys ``[B, H_kv, S, d]``, query head h on KV head h // G), the last chunk zero-padded as
    kvpress pads it (padded keys at logit -1e-9, padded queries attending uniformly)."""
    batch, n_q, n_tokens, dim = queries.shape
    group = n_q // keys.shape[1]
    q = queries.float()
    k = keys.float().repeat_interleave(group, dim=1)
    n_chunks = math.ceil(n_tokens / chunk_size)
    pad = n_chunks * chunk_size - n_tokens
    q, k = F.pad(q, (0, 0, 0, pad)), F.pad(k, (0, 0, 0, pad))
    logits = q.reshape(batch, n_q, n_chunks, chunk_size, dim) @ k.reshape(batch, n_q, n_chunks, chunk_size, dim
                                                                           ).transpose(-2, -1)
    if pad:
        logits[:, :, -1, :, chunk_size - pad:] = -1e-9  # kvpress's key mask (every row of the last chunk)
    return logits.softmax(dim=-1).sum(dim=-2).reshape(batch, n_q, -1)[..., :n_tokens]


@register_scorer("compactor")
class CompactorScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts
    supports_decoding = False  # scores with every prefill query over its keys (one query per cached entry)

    def __init__(self, sink_size_start: NonNegative = 8, sink_size_end: NonNegative = 4, chunk_size: Count = 256,
                 sketch_dimension: Count | None = 48, blending: NonNegativeFloat | None = None,
                 ridge: NonNegativeFloat = 1e-2):
        self.sink_size_start, self.sink_size_end = int(sink_size_start), int(sink_size_end)
        self.chunk_size = int(chunk_size)
        self.sketch_dimension = None if sketch_dimension is None else int(sketch_dimension)
        self.blending = None if blending is None else float(blending)
        self.ridge = float(ridge)
        self.shares_across_ratios = self.blending is not None  # blending = compression ratio: one prefill each
        self._compression_ratio: float | None = None

    def prefill_patch(self, model, keep_ratio: float):
        # Nothing in the prefill changes; the ratio is what blending = null blends with (kvpress's default).
        self._compression_ratio = 1.0 - float(keep_ratio)
        return nullcontext()

    def _blending(self) -> float:
        if self.blending is not None:
            return self.blending
        if self._compression_ratio is None:
            raise KvbenchError("compactor with blending=null needs the keep ratio (harness.pipeline.prefill "
                               "enters the scorer's prefill_patch)")
        return self._compression_ratio

    def score(self, inputs: LayerInputs) -> Tensor:
        n_tokens = inputs.keys.shape[2]
        left = min(self.sink_size_start, n_tokens)
        right = min(self.sink_size_end, max(0, n_tokens - left))
        stop = n_tokens - right
        if stop <= left:  # nothing between the protected ends
            return torch.ones(inputs.keys.shape[:3], device=inputs.keys.device)
        keys, values = inputs.keys[:, :, left:stop], inputs.values[:, :, left:stop]
        geometry = layer_zscore(sketched_leverage(inputs, prerope_keys(inputs, left, stop), self.sketch_dimension,
                                                  self.ridge))
        attention = non_causal_chunk_attention(inputs.queries[:, :, left:stop], keys, self.chunk_size)
        attention = per_kv_head(attention, keys.shape[1]) * values.float().norm(dim=-1)
        attention = layer_zscore(pool_scores(attention, 3, "avg"))
        scores = self._blending() * geometry + attention
        return F.pad(scores, (left, right), value=float(scores.max()))
