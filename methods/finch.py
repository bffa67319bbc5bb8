"""Finch ("FINCH: Prompt-guided Key-Value Cache Compression for Large Language Models", Corallo & Papotti, TACL 2024;
arXiv:2408.00167): the prompt (the question) chooses the context's key-value pairs, by the attention its tokens
give them.

Per layer and KV head, as kvpress 0.5.5's ``FinchPress`` (one shot, ``chunk_length=None``):

1. The observation window is the question: the last ``n_question`` tokens of a query-aware prefill (the harness
   says how many, ``Scorer.begin_prefill``; kvpress finds them after a delimiter token). A prefill without a
   question (query-agnostic: the question comes after compression) observes its last ``window`` tokens instead.
2. Softmax attention of the window's queries over every key (causal); with ``normalize``, each query's row is
   multiplied by its position ``p`` (kvpress's count of "non-zero weights", ``arange(T - w, T)``), so late queries,
   whose attention is spread over more keys, weigh as much as early ones.
3. Averaged over the window's queries, then over the query heads of the KV head, for the tokens before the window
   (no pooling, unlike SnapKV).
4. The window itself scores ``max + 1`` (the max over the layer), so the question is always kept, inside the
   budget as in kvpress.

What differs from the paper and kvpress, and why:

* The paper prefills the document chunk by chunk, each chunk followed by the prompt, keeping the top pairs of
  chunk + kept cache at each step, so a context longer than the model's window fits. kvbench's prefill is one
  shot, as kvpress's default ``FinchPress`` (its ``chunk_length`` only splits the top-k of one-shot scores into
  fixed chunks, which the per-head top-k contract does not express; not offered).
* kvpress re-rotates the kept keys to contiguous positions (``rerotate_keys=True``, the paper's positional
  re-encoding); kvbench keeps each entry at its true position and decodes at true positions (the kept set, which
  the conformance compares, is the same either way).
* Defaults are kvpress's (``normalize: true``); ``window`` (query-agnostic only) has no kvpress counterpart, since
  kvpress's Finch refuses a prompt without its delimiter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer
from harness.schema import Count
from methods._attention import attention_probs, per_kv_head


def finch_scores(inputs: LayerInputs, window: int, normalize: bool) -> Tensor:
    """Steps 2-4 of the module docstring for an observation window of the last ``window`` tokens."""
    n_tokens = inputs.keys.shape[2]
    window = max(1, min(window, n_tokens - 1)) if n_tokens > 1 else n_tokens
    window = min(window, inputs.queries.shape[2])  # a chunked prefill's chunk may be shorter than the window
    n_prefix = n_tokens - window
    batch, n_kv = inputs.keys.shape[:2]
    if n_prefix == 0:
        return torch.zeros(batch, n_kv, n_tokens, device=inputs.keys.device)
    probs = attention_probs(inputs.queries[:, :, -window:], inputs.keys, inputs.scaling, n_prefix)[..., :n_prefix]
    if normalize:
        probs = probs * torch.arange(n_prefix, n_tokens, device=probs.device, dtype=probs.dtype)[:, None]
    scores = per_kv_head(probs.mean(dim=2), n_kv)
    return F.pad(scores, (0, window), value=float(scores.max()) + 1.0)


@register_scorer("finch")
class FinchScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts

    def __init__(self, normalize: bool = True, window: Count = 32):
        self.normalize = bool(normalize)
        self.window = int(window)
        self.n_question = 0

    def begin_prefill(self, ids: list[int], n_question: int) -> None:
        self.n_question = int(n_question)

    def score(self, inputs: LayerInputs) -> Tensor:
        return finch_scores(inputs, self.n_question or self.window, self.normalize)
