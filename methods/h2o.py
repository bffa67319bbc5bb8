"""H2O (Zhang et al., 2023): heavy hitters = tokens with the largest attention accumulated over all queries,
plus a recent window.

The score sums, for each key, the attention every prefill query gives it (chunked, never the full matrix),
averaged over the query heads of a GQA group. The paper splits the budget between heavy hitters and recent
tokens (``recent_share`` in conf/method/h2o.yaml, 0.5 by default; 0 = kvpress's ObservedAttentionPress
without a window). ``normalize: true`` divides each key's sum by the number of queries that see it, so early
tokens are not favoured only for being seen more often.

While decoding compresses (``decoding.mode=decode|both``, ``harness.decoding``) H2O is online, as the paper
defines it: each layer keeps, for every cached entry, the attention it has received so far -- from every prefill
query, then from each decoded query as it attends (``decode_step``) -- and a cut keeps the entries with the largest
accumulated sums (normalised by how many queries saw each, with ``normalize``); the sums are cut with the cache.
After a chunked prefill (``method.prefill_chunk``) the sums start from the decoded queries' attention alone.
"""
from __future__ import annotations

import torch
from torch import Tensor

from harness.cache import RaggedKV
from harness.compress import KVPRESS_BUDGET, LayerInputs, Scorer, register_scorer
from methods._attention import attention_column_sums, per_kv_head


@register_scorer("h2o")
class H2OScorer(Scorer):
    needs_row_lse = True  # its column sums reuse the prefill's own row log-sum-exps
    # kvpress's ObservedAttentionPress: normalised sums, no recent window.
    PRESETS = {"kvpress": {"scorer": {"normalize": True}, "selector": {"recent_share": 0.0}, **KVPRESS_BUDGET}}

    def __init__(self, normalize: bool = False):
        self.normalize = normalize
        # per layer: the last prefill's raw sums [H_kv, T] and how many queries saw each key (online decoding)
        self._prefill: dict[int, tuple[Tensor, Tensor]] = {}
        # per layer, per KV head: accumulated sums and query counts aligned with the cache's entries
        self._sums: dict[int, list[Tensor]] = {}
        self._seen: dict[int, list[Tensor]] = {}

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        sums = per_kv_head(attention_column_sums(inputs.queries, inputs.keys, inputs.scaling, row_lse=inputs.row_lse),
                           inputs.keys.shape[1])
        n_tokens, q_len = inputs.keys.shape[2], inputs.queries.shape[2]
        seen_by = torch.arange(n_tokens, 0, -1, device=sums.device, dtype=sums.dtype)
        # key j is seen by the queries at or after it: T - j in a whole prefill, at most the chunk's in a chunk
        self._prefill[inputs.layer_idx] = (sums[0], seen_by.clamp(max=q_len))
        return sums / seen_by if self.normalize else sums

    def begin_decoding(self, kept) -> None:
        self._sums, self._seen = {}, {}
        if kept is None:  # after a chunked prefill: its last scores cover a chunk, not the cache; start from zero
            return
        for layer, (sums, seen) in self._prefill.items():
            idx = kept[layer]
            heads = range(sums.shape[0])
            if idx is None:
                cut = [torch.arange(sums.shape[1])] * sums.shape[0]
            else:
                cut = list(idx) if isinstance(idx, list) else list(idx.unbind(0))
            self._sums[layer] = [sums[h, cut[h].to(sums.device)] for h in heads]
            self._seen[layer] = [seen[cut[h].to(seen.device)] for h in heads]

    def decode_step(self, layer_idx: int, query: Tensor, key, scaling: float) -> None:
        if isinstance(key, RaggedKV):  # each head over its own entries, with its query group
            group = query.shape[1] // len(key.heads)
            received = [per_kv_head(attention_column_sums(query[:, h * group:(h + 1) * group], k, scaling), 1)[0, 0]
                        for h, k in enumerate(key.heads)]
        else:  # one call for the layer's heads
            received = list(per_kv_head(attention_column_sums(query, key, scaling), key.shape[1])[0])
        sums, seen = self._sums.setdefault(layer_idx, []), self._seen.setdefault(layer_idx, [])
        q_len = query.shape[2]
        for h, got in enumerate(received):
            if h == len(sums):  # no prefill sums to carry on (after a chunked prefill): from zero
                sums.append(got.new_zeros(0))
                seen.append(got.new_zeros(0))
            n_tokens = got.shape[0]
            # the step's queries see every older entry, and its own entries bottom-right causally
            step_seen = torch.arange(n_tokens, 0, -1, device=got.device, dtype=got.dtype).clamp(max=q_len)
            grown = n_tokens - sums[h].shape[0]
            sums[h] = torch.cat([sums[h].to(got.device), got.new_zeros(grown)]) + got
            seen[h] = torch.cat([seen[h].to(got.device), got.new_zeros(grown)]) + step_seen

    def decode_score(self, inputs: LayerInputs) -> Tensor:
        layer = inputs.layer_idx
        heads = range(inputs.keys.shape[1]) if inputs.kv_head is None else [inputs.kv_head]
        rows = []
        for h in heads:
            sums, seen = self._sums[layer][h], self._seen[layer][h]
            rows.append(sums / seen.clamp(min=1) if self.normalize else sums)
        return torch.stack(rows)[None]

    def decode_kept(self, layer_idx: int, kept: list[Tensor]) -> None:
        self._sums[layer_idx] = [s[i.to(s.device)] for s, i in zip(self._sums[layer_idx], kept)]
        self._seen[layer_idx] = [s[i.to(s.device)] for s, i in zip(self._seen[layer_idx], kept)]
