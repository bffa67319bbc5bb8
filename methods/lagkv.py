"""LagKV ("LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important", arXiv:2504.04704):
attention-free. After the ``n_sink`` first tokens the cache is cut into partitions of ``lag_size`` tokens; each
partition is judged against the *next* one (its lag reference), which the model wrote later and so reflects what
the context turned into:

1. per head and channel, the min and max of the reference partition's keys (values);
2. the current partition's keys (values) min-max normalised with them, ``(x - min) / (max - min)``;
3. a token's key (value) score is the standard deviation of its normalised channels, softmaxed over the tokens
   of its partition; the token's score is ``(key + score_v_ratio * value) / (1 + score_v_ratio)`` (kvpress's
   mean of the two at ``score_v_ratio = 1``, the official code's sum, the same order);
4. the last full partition (it has no reference) and the remainder after it are the tail, always kept with the
   sinks (score 1).

The official code compresses as the cache grows, keeping the same share of every partition. With one budget per
head (kvbench's and kvpress's), each score is replaced by its rank inside its partition divided by ``lag_size``
(``cross_scoring: false``, kvpress): a global top-k then takes the same number of tokens from every partition (up
to the order torch.topk breaks equal ranks in). ``cross_scoring: true`` keeps the raw scores, so partitions
compete (meant for AdaKV's cross-head budgets). A prefill shorter than ``n_sink + 2 * lag_size`` has no scored
partition: the sinks score 1 and the others their position, so the most recent tokens are kept (kvpress).

Defaults are the official code's (CMB-AI-LAB ``lagkv_cache``: 16 sinks, lag 128, keys and values weighed alike);
``method.preset=kvpress`` is kvpress 0.5.5's ``LagKVPress`` (4 sinks, lag 128) with its counts. The sinks are
the selector's ``n_sink`` (the scorer's ``n_sink`` follows it), so they stay inside any budget.

One guard kvpress lacks: a channel constant over the reference partition (max = min) divides by 1 instead of 0,
where kvpress's score would be inf/NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from harness.compress import KVPRESS_BUDGET, LayerInputs, Scorer, register_scorer
from harness.schema import Count, NonNegative, NonNegativeFloat


def lag_relative_scores(states: Tensor, lag_size: int) -> Tensor:
    """Steps 1-3 for ``states [B, H, P * lag_size, D]`` (whole partitions): ``[B, H, P - 1, lag_size]``, the
    softmaxed std of every token of partitions ``0..P-2`` normalised by the min/max of the next partition."""
    batch, n_heads, n_tokens, dim = states.shape
    parts = states.reshape(batch, n_heads, n_tokens // lag_size, lag_size, dim)
    current, reference = parts[:, :, :-1], parts[:, :, 1:]
    low = reference.amin(dim=-2, keepdim=True)
    span = reference.amax(dim=-2, keepdim=True) - low
    span = torch.where(span == 0, torch.ones_like(span), span)
    return ((current - low) / span).std(dim=-1).softmax(dim=-1)


@register_scorer("lagkv")
class LagKVScorer(Scorer):
    PRESETS = {"kvpress": {"selector": {"n_sink": 4}, **KVPRESS_BUDGET}}  # scorer.n_sink follows the selector's

    def __init__(self, n_sink: NonNegative = 16, lag_size: Count = 128, score_v_ratio: NonNegativeFloat = 1.0,
                 cross_scoring: bool = False):
        self.n_sink = int(n_sink)
        self.lag_size = int(lag_size)
        self.score_v_ratio = float(score_v_ratio)
        self.cross_scoring = bool(cross_scoring)

    def score(self, inputs: LayerInputs) -> Tensor:
        keys, values = inputs.keys.float(), inputs.values.float()
        batch, n_heads, n_tokens, _ = keys.shape
        sink, lag = self.n_sink, self.lag_size
        ones = lambda n: torch.ones(batch, n_heads, n, device=keys.device)
        if n_tokens < sink + 2 * lag:  # no partition has a reference: keep the sinks, then the most recent
            scores = ones(n_tokens)
            if n_tokens > sink:
                ramp = torch.arange(n_tokens - sink, device=keys.device, dtype=torch.float32) / (n_tokens - sink)
                scores[:, :, sink:] = ramp
            return scores
        end = sink + (n_tokens - sink) // lag * lag
        r = self.score_v_ratio
        scores = (lag_relative_scores(keys[:, :, sink:end], lag)
                  + r * lag_relative_scores(values[:, :, sink:end], lag)) / (1 + r)  # [B, H, P - 1, lag]
        if not self.cross_scoring:  # rank inside the partition: every partition gives the same share
            scores = scores.argsort(dim=-1).argsort(dim=-1).float() / lag
        tail = n_tokens - sink - scores.shape[2] * lag
        return torch.cat((ones(sink), scores.reshape(batch, n_heads, -1), ones(tail)), dim=-1)
