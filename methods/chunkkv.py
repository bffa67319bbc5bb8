"""ChunkKV (Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference",
arXiv:2502.00299): whole chunks of consecutive tokens are kept or evicted, so kept context stays readable.

On any scorer (``scorer: {name: chunkkv, base: snapkv}``; ``method.scorer.base=<scorer>`` wraps another one):

* the prompt of ``T`` tokens is cut into chunks of ``chunk_length`` (the last one shorter when ``T`` is no
  multiple); a chunk's score is the mean over its tokens of the base scores summed over the KV heads, so every head
  of a layer keeps the same chunks;
* allocator ``chunk``: ``max(1, int(n_chunks * keep))`` chunks are kept (the method's budget rule counts them:
  kvpress's ``int(n_chunks * (1 - cr))`` under the kvpress preset), the budget of every head is their total
  length; with fewer tokens than one chunk, the base's own per-head top ``n_keep(T)``;
* ``rerank`` (the declared budget-dependent step) orders tokens chunk by chunk, best chunk first (equal chunk
  scores: the earlier chunk), so the selector's top-budget is exactly those whole chunks. Under another allocator
  (a budget that is no sum of chunk lengths) the last chunk is cut, its tokens by their head-summed base score.

Protected tokens (the selector's sinks and recent window) enter the chunk means as ``max + 1`` (the largest finite
base score of the layer plus one), which is what kvpress's SnapKV puts in its window before ChunkKV averages; the
selector keeps them in any case. Where the budget is smaller than the window (few chunks kept), the selector keeps
the protected tokens ``rerank`` ranks best, i.e. the best whole window chunks (equal ones: the earlier), where
kvpress keeps whichever of the tied window chunks torch.topk returns.

Defaults: chunk_length 10, the paper's default ("a robust default across tasks and models"); kvpress's ChunkKVPress
uses 20 (``method.preset=kvpress``, with the base's own kvpress values: SnapKV's window 64, kernel 5, avg-pool).
Not here: the paper's layer-wise index reuse (a speed-up that shares one layer's chunks with the next layers; kvpress
does not have it either).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from harness.compress import (KVPRESS_BUDGET, KVPRESS_COUNTS_ONLY, Allocator, WrappedScorer, n_keep,
                              register_allocator, register_scorer)
from harness.errors import KvbenchError
from harness.schema import Count


def padded(scores: Tensor) -> Tensor:
    """A layer's scores ``[H, T]`` (float32) with +inf (protected) entries at the largest finite score + 1: what
    kvpress's SnapKV puts in its window."""
    s = scores.float().clone()
    forced = torch.isposinf(s)
    if bool(forced.any()):
        finite = torch.isfinite(s)
        s[forced] = (float(s[finite].max()) if bool(finite.any()) else 0.0) + 1.0
    return s


def chunk_means(scores: Tensor, chunk_length: int) -> Tensor:
    """Per chunk, the mean over its tokens of the head-summed scores of one layer ``[H, T]`` -> ``[ceil(T / L)]``;
    +inf (protected) entries count as the layer's largest finite score + 1 (``padded``)."""
    summed = padded(scores).sum(dim=0)
    n_tokens = summed.numel()
    n_full, rest = divmod(n_tokens, chunk_length)
    means = summed[: n_full * chunk_length].view(n_full, chunk_length).mean(dim=-1)
    if rest:
        means = torch.cat([means, summed[n_full * chunk_length :].mean().reshape(1)])
    return means


def chunk_order(scores: Tensor, chunk_length: int) -> Tensor:
    """Chunk indices, best first (ties: the earlier chunk)."""
    return torch.sort(chunk_means(scores, chunk_length), descending=True, stable=True).indices


def chunk_lengths(n_tokens: int, chunk_length: int) -> Tensor:
    n_chunks = math.ceil(n_tokens / chunk_length)
    lengths = torch.full((n_chunks,), chunk_length, dtype=torch.long)
    lengths[-1] = n_tokens - chunk_length * (n_chunks - 1)
    return lengths


def chunk_budget(scores: Tensor, chunk_length: int, keep_ratio: float, rule: str) -> int:
    """Entries every head of a layer keeps: the total length of its top ``max(1, int(n_chunks * keep))`` chunks;
    with fewer tokens than one chunk, ``n_keep(T)`` (kvpress's ChunkKV falls back to its base press then)."""
    n_tokens = scores.shape[-1]
    if n_tokens < chunk_length:
        return n_keep(n_tokens, keep_ratio, rule)
    lengths = chunk_lengths(n_tokens, chunk_length)
    n_chunks = n_keep(len(lengths), keep_ratio, rule)  # max(1, int(n_chunks * (1 - cr))) under kvpress's rule
    return int(lengths[chunk_order(scores, chunk_length)[:n_chunks]].sum())


def chunk_ranked(scores: Tensor, chunk_length: int) -> Tensor:
    """Scores ``[H, T]`` (float64, the same for every head) whose top-b is the best chunks whole, in chunk order,
    then the best tokens (head-summed score) of the next chunk: chunk rank first, token rank inside the chunk second."""
    n_heads, n_tokens = scores.shape
    order = chunk_order(scores, chunk_length)
    n_chunks = len(order)
    chunk_rank = torch.empty(n_chunks, dtype=torch.long)
    chunk_rank[order] = torch.arange(n_chunks)
    position = torch.arange(n_tokens)
    token_chunk = position // chunk_length
    summed = padded(scores).sum(dim=0)
    # rank of each token inside its chunk by head-summed score (0 = best)
    inner = torch.empty(n_tokens, dtype=torch.long)
    for start in range(0, n_tokens, chunk_length):
        block = summed[start : start + chunk_length]
        inner[start + torch.sort(block, descending=True, stable=True).indices] = torch.arange(block.numel())
    key = (n_chunks - chunk_rank[token_chunk]).double() * (chunk_length + 1) + (chunk_length - inner).double()
    return key.to(scores.device).expand(n_heads, -1)


@register_scorer("chunkkv")
class ChunkKVScorer(WrappedScorer):
    OWN_ALLOCATORS = ("chunk",)
    PRESETS = {"kvpress": {"scorer": {"chunk_length": 20}, **KVPRESS_BUDGET}}

    def __init__(self, base="snapkv", chunk_length: Count = 10):
        super().__init__(base)
        self.chunk_length = int(chunk_length)

    def rerank(self, layer_idx: int, scores: Tensor, budgets: Tensor) -> Tensor:
        # The chunks are ranked by the base's scores as the allocator saw them (a base's own rerank is not applied:
        # the chunk allocator counted its budget on this ranking).
        if scores.shape[-1] < self.chunk_length:  # no whole chunk: the base's per-head selection (kvpress too)
            return self.base.rerank(layer_idx, scores, budgets)
        return chunk_ranked(scores, self.chunk_length)


@register_allocator("chunk")
class ChunkAllocator(Allocator):
    """Every head of a layer keeps the total length of the layer's top chunks (``methods/chunkkv.py``)."""

    per_layer_budgets = True  # the shorter last chunk is in some layers' top chunks and not in others'

    def __init__(self, chunk_length: Count = 10):
        self.chunk_length = int(chunk_length)

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:
        return torch.stack([torch.full((s.shape[0],), chunk_budget(s, self.chunk_length, keep_ratio, self.budget_rule),
                                       dtype=torch.long) for s in scores])


EPSILON = 1e-8  # kvpress's EntropyGatedChunkKVPress: keeps the normalised scores and their log finite


def chunk_entropies(summed: Tensor, chunk_length: int) -> Tensor:
    """Normalised entropy in [0, 1] of each chunk's head-summed token scores ``[T]`` (a chunk with negative scores
    is shifted to start at 0; the short last chunk is normalised by its own length, 0 for a single token)."""
    n_tokens = summed.numel()
    out = []
    for start in range(0, n_tokens, chunk_length):
        block = summed[start : start + chunk_length]
        if block.numel() == 1:
            out.append(torch.zeros((), dtype=summed.dtype))
            continue
        block = block - block.min().clamp(max=0.0)
        p = block / (block.sum() + EPSILON)
        h = -(p * (p + EPSILON).log()).sum()
        out.append((h / math.log(block.numel())).clamp(0.0, 1.0))
    return torch.stack(out)


def entropy_gated_keep(scores: Tensor, chunk_length: int, low_entropy_length: int, budget: int) -> Tensor:
    """The kept positions ``[T]`` (bool) of kvpress's EntropyGatedChunkKVPress for one layer's scores ``[H, T]``
    (protected entries at max + 1): chunks in decreasing mean head-summed score (ties: the earlier chunk) are kept
    whole while the budget lasts, except a chunk both important (score >= the median chunk score) and spiky
    (entropy < the median entropy), of which only its top ``low_entropy_length`` tokens are kept; the budget left
    over goes to the best remaining tokens, so exactly ``budget`` tokens are kept."""
    summed = padded(scores).sum(dim=0)
    n_tokens = summed.numel()
    means = chunk_means(scores, chunk_length)
    entropy = chunk_entropies(summed, chunk_length)
    important = means >= means.median()  # torch's median: the lower of the two middle values, as kvpress
    spiky = entropy < entropy.median()
    keep = torch.zeros(n_tokens, dtype=torch.bool)
    left = budget
    for chunk in torch.sort(means, descending=True, stable=True).indices.tolist():
        if left <= 0:
            break
        start, end = chunk * chunk_length, min(n_tokens, (chunk + 1) * chunk_length)
        n = min(end - start, left)
        if bool(important[chunk]) and bool(spiky[chunk]):
            n = min(n, low_entropy_length)
        if n == end - start:
            keep[start:end] = True
        else:
            keep[start + summed[start:end].topk(n).indices] = True
        left -= n
    if left > 0:
        rest = (~keep).nonzero().flatten()
        keep[rest[summed[rest].topk(min(left, rest.numel())).indices]] = True
    return keep


@register_scorer("entropy_chunkkv")
class EntropyGatedChunkKVScorer(ChunkKVScorer):
    """ChunkKV whose important but spiky chunks keep only their best tokens, the budget saved spent on more chunks
    (kvpress's EntropyGatedChunkKVPress, no paper of its own): the budget is the allocator's (uniform: exactly
    ``n_keep(T)`` per head, not whole chunks). Defaults are kvpress's (chunks of 10, 4 tokens of a spiky chunk)."""

    OWN_ALLOCATORS = ()
    PRESETS = KVPRESS_COUNTS_ONLY

    def __init__(self, base="snapkv", chunk_length: Count = 10, low_entropy_length: Count = 4):
        super().__init__(base, chunk_length)
        self.low_entropy_length = int(low_entropy_length)
        if self.low_entropy_length >= self.chunk_length:
            raise KvbenchError(f"method.scorer.low_entropy_length={low_entropy_length} must be smaller than "
                               f"method.scorer.chunk_length={chunk_length} (the tokens a spiky chunk keeps)")

    def rerank(self, layer_idx: int, scores: Tensor, budgets: Tensor) -> Tensor:
        if scores.shape[-1] < self.chunk_length:
            return self.base.rerank(layer_idx, scores, budgets)
        rows, done = [], {}
        for budget in budgets.tolist():  # every head of a layer keeps the same tokens for the same budget
            if budget not in done:
                keep = entropy_gated_keep(scores, self.chunk_length, self.low_entropy_length, int(budget))
                done[budget] = keep.double().to(scores.device)
            rows.append(done[budget])
        return torch.stack(rows)
