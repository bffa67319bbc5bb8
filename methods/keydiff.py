"""KeyDiff ("KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained
Environments", arXiv:2504.15364): attention-free; a key that looks like the average key adds little, so the score
of token ``j`` in a KV head is ``-cos(k_j, anchor)`` with ``anchor`` the mean of the head's L2-normalised keys
(higher = more distinctive = kept).

As kvpress 0.5.5's ``KeyDiffPress``: one shot over the whole prefill (post-RoPE keys, the anchor over every
cached token of the head), no sinks or window of its own. The paper applies it block by block while the prompt is
prefilled (kvpress: ``BlockPress(KeyDiffPress(...), block_size)``); that needs the chunked-prefill option, which
kvbench does not have yet, so this is the one-shot form, the same for our defaults and ``method.preset=kvpress``.
"""
import torch
import torch.nn.functional as F

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer


@register_scorer("keydiff")
class KeyDiffScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # the one-shot defaults are kvpress's: preset=kvpress only sets its counts

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        keys = inputs.keys.float()
        anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)  # [B, H_kv, 1, D]
        return -F.cosine_similarity(keys, anchor, dim=-1)
