"""CaM ("CaM: Cache Merging for Memory-efficient LLMs Inference", Zhang et al., ICML 2024, PMLR 235:58840;
https://openreview.net/forum?id=LCTmppB165, code github.com/zyxxmu/cam): an evicted token's value is not dropped
but, with a probability set by its attention, spread over the kept tokens that follow it.

Per layer and KV head, after a base scorer and the selector chose the kept tokens (any scorer, wrapped:
``method.scorer.base=<scorer>``; StreamingLLM by default, the integration of CaM's official code):

1. ``A``: the cumulative attention every prefill query gave each token (the paper's ``A_bar``, Algorithm 1),
   averaged over the query heads of the KV head's group (as kvpress).
2. For each evicted token ``i``: its merge window = the ``merge_budget`` (``m``) first kept tokens after it in
   sequence order (fewer at the end of the sequence; none after the last kept token: nothing merges).
3. Merge probability ``p_i = clamp(A_i / mean(A over the window), 0, 1)`` (paper Eq. 14; 0/0 -> 0, x/0 -> 1) and a
   Bernoulli draw ``mask_i ~ B(p_i)``, made as ``u_i < p_i`` with ``u`` uniform from the layer's generator, drawn
   when the layer is scored, so a seed gives the same draws whatever the keep ratios of the run.
4. Every kept token ``j`` of the window gets ``v_j += mask_i * v_i / |window|`` (values read before any merge: no
   cascade within one pass); keys are not touched, so RoPE positions stay right. The cache then keeps only the
   kept entries: ``kv_bytes`` is the kept count, as without merging.

How this differs, and why:

* kvbench compresses once, after the prefill, so the prefill is the "interval" of CaM's per-step algorithm: every
  token it evicts is merged. kvpress's ``CAMPress`` is a decoding press: it compresses every
  ``compression_interval`` decoding steps to ``target_size`` entries and merges only the ``k`` best-scored evicted
  tokens, ``k`` = steps since the last compression, with ``A`` accumulated over decoding queries. Its bulk merge
  itself (windows, probability, scale) is what steps 2-4 do; tools/conformance/dump_cam.py checks it.
* The official code (a simulation with attention masks) merges token by token as it leaves the recent window, into
  the next ``m`` positions, with the probability relative to the max (not mean) attention of the kept tokens; we
  follow the paper's Eq. 14 (mean), as kvpress does.
* kvpress keeps one token set for all KV heads (its base scores averaged over the heads, ``shared_heads: true``
  under ``method.preset=kvpress``); our default selects per head, as the base scorer scores.
* The selector is the method config's (4 sinks, StreamingLLM's); a base with a window of its own (SnapKV) needs
  ``method.selector.n_recent`` as its method config sets it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from harness.compress import KVPRESS_BUDGET, LayerInputs, WrappedScorer, register_scorer
from harness.schema import Count
from methods._attention import attention_column_sums, per_kv_head
from methods._merge import evicted_of, heads_of


def cam_merge(values: Tensor, kept: Tensor, attn: Tensor, uniform: Tensor, merge_budget: int) -> Tensor:
    """One head's kept values after CaM's merge (steps 2-4 of the module docstring).

    ``values`` ``[T, D]``, ``kept`` sorted ``[b]``, ``attn`` (cumulative attention) and ``uniform`` (the draws) ``[T]``.
    Returns ``[b, D]`` in ``values``' dtype, accumulated in float32.
    """
    n_tokens, n_kept = values.shape[0], kept.shape[0]
    out = values[kept].float()
    evicted = evicted_of(kept, n_tokens)
    if evicted.numel() == 0 or n_kept == 0:
        return out.to(values.dtype)
    start = torch.searchsorted(kept, evicted, right=True)  # first kept token after each evicted one
    window = start[:, None] + torch.arange(merge_budget, device=kept.device)  # [E, m] positions in ``kept``
    valid = window < n_kept
    window = window.clamp(max=n_kept - 1)
    size = valid.sum(dim=-1)  # [E]
    attn = attn.float()
    mean = (attn[kept][window] * valid).sum(dim=-1) / size.clamp(min=1)
    prob = attn[evicted] / mean
    prob = torch.where(prob.isnan(), torch.zeros_like(prob), prob)
    prob = torch.where(prob.isinf(), torch.ones_like(prob), prob).clamp(0.0, 1.0)
    merged = (uniform[evicted].to(prob.device) < prob).float()
    scale = torch.where(size > 0, merged / size.clamp(min=1), torch.zeros_like(merged))
    share = values[evicted].float() * scale[:, None]  # [E, D]: what each window target receives
    out.index_add_(0, window[valid], share[:, None, :].expand(-1, merge_budget, -1)[valid])
    return out.to(values.dtype)


@register_scorer("cam")
class CaMScorer(WrappedScorer):
    # kvpress's CAMPress: one kept set for every KV head (its base scores averaged over the heads), its counts.
    PRESETS = {"kvpress": {"scorer": {"shared_heads": True}, **KVPRESS_BUDGET}}
    needs_row_lse = True  # its attention sums reuse the prefill's own row log-sum-exps

    def __init__(self, base="streaming_llm", merge_budget: Count = 32, shared_heads: bool = False):
        super().__init__(base)
        self.merge_budget = int(merge_budget)
        self.shared_heads = bool(shared_heads)
        self.stats: dict[int, tuple[Tensor, Tensor]] = {}  # per layer of the last prefill: (A, u), each [H_kv, T]

    def score(self, inputs: LayerInputs) -> Tensor | None:
        scores = self.base.score(inputs)
        if scores is None:  # a layer the base keeps whole: nothing is evicted there, nothing merges
            return None
        n_kv = inputs.keys.shape[1]
        attn = per_kv_head(attention_column_sums(inputs.queries, inputs.keys, inputs.scaling, row_lse=inputs.row_lse),
                           n_kv)
        uniform = torch.rand(attn.shape, generator=inputs.generator).to(attn.device)
        self.stats[inputs.layer_idx] = (attn[0], uniform[0])
        if self.shared_heads:
            scores = scores.float().mean(dim=1, keepdim=True).expand_as(scores)
        return scores

    def merge(self, layer_idx: int, keys: Tensor, values: Tensor, kept: Tensor | list[Tensor]
              ) -> tuple[Tensor, Tensor]:
        attn, uniform = self.stats[layer_idx]
        merged = values.clone()  # the prefill cache is shared by every keep ratio: never written into
        for head, idx in enumerate(heads_of(kept)):
            idx = idx.to(values.device)
            merged[0, head, idx] = cam_merge(values[0, head], idx, attn[head], uniform[head], self.merge_budget)
        return keys, merged
