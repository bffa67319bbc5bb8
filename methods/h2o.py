"""H2O (Zhang et al., 2023): heavy hitters = tokens with the largest attention accumulated over all queries,
plus a recent window.

The score sums, for each key, the attention every prefill query gives it (chunked, never the full matrix),
averaged over the query heads of a GQA group. The paper splits the budget between heavy hitters and recent
tokens (``recent_share`` in conf/method/h2o.yaml, 0.5 by default; 0 = kvpress's ObservedAttentionPress
without a window). ``normalize: true`` divides each key's sum by the number of queries that see it, so early
tokens are not favoured only for being seen more often.
"""
import torch

from harness.compress import KVPRESS_BUDGET, LayerInputs, Scorer, register_scorer
from methods._attention import attention_column_sums, per_kv_head


@register_scorer("h2o")
class H2OScorer(Scorer):
    # kvpress's ObservedAttentionPress: normalised sums, no recent window.
    PRESETS = {"kvpress": {"scorer": {"normalize": True}, "selector": {"recent_share": 0.0}, **KVPRESS_BUDGET}}

    def __init__(self, normalize: bool = False):
        self.normalize = normalize

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        sums = attention_column_sums(inputs.queries, inputs.keys, inputs.scaling)
        if self.normalize:
            n_tokens = inputs.keys.shape[2]
            seen_by = torch.arange(n_tokens, 0, -1, device=sums.device, dtype=sums.dtype)
            sums = sums / seen_by
        return per_kv_head(sums, inputs.keys.shape[1])
