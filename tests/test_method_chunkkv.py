"""ChunkKV (methods/chunkkv.py): chunk scores, the chunk allocator's budgets and whole-chunk selections by hand."""
from __future__ import annotations

import torch

import methods
from harness.compress import LayerInputs, Method, Scorer, Selector, UniformAllocator, select
from methods.chunkkv import ChunkAllocator, ChunkKVScorer, chunk_budget, chunk_means


class Fixed(Scorer):
    def __init__(self, scores):
        self.scores = torch.as_tensor(scores, dtype=torch.float32)

    def score(self, inputs):
        return self.scores[None]


def plan(scores, chunk_length, keep_ratio, allocator=None, selector=Selector(), rule="floor"):
    scorer = ChunkKVScorer(base=Fixed(scores), chunk_length=chunk_length)
    method = Method("m", scorer, allocator or ChunkAllocator(chunk_length), selector, budget_rule=rule)
    n_heads, n_tokens = scorer.base.scores.shape
    inputs = LayerInputs(0, 1, torch.zeros(1, n_heads, n_tokens, 2), torch.zeros(1, n_heads, n_tokens, 2),
                         torch.zeros(1, n_heads, n_tokens, 2), None, torch.Generator())
    budgets, kept = method.plan([scorer.score(inputs)], keep_ratio)
    layer = kept[0]
    rows = list(layer) if isinstance(layer, list) else list(layer.unbind(0))
    return budgets[0].tolist(), [sorted(int(i) for i in r) for r in rows]


def test_chunk_means_by_hand():
    # 2 heads, 5 tokens, chunks of 2: head sums 3 7 11 15 19 -> chunk means 5, 13, and the short last chunk 19
    scores = torch.tensor([[1.0, 3, 5, 7, 9], [2.0, 4, 6, 8, 10]])
    assert chunk_means(scores, 2).tolist() == [5.0, 13.0, 19.0]
    # a protected (+inf) entry counts as the layer's max finite score + 1 (kvpress's SnapKV window padding)
    scores[:, 4] = float("inf")
    assert chunk_means(scores, 2).tolist() == [5.0, 13.0, 2 * 9.0]  # (8 + 1) per head, summed over 2 heads


def test_budget_is_the_length_of_the_best_chunks():
    scores = torch.tensor([[1.0, 3, 5, 7, 9]])  # chunks of 2: means 2, 6, 9 (the last one alone)
    # 3 chunks, keep 0.5 -> max(1, floor(1.5)) = 1 chunk: the short last one, 1 token
    assert chunk_budget(scores, 2, 0.5, "floor") == 1
    assert chunk_budget(-scores, 2, 0.5, "floor") == 2  # reversed: the first chunk, 2 tokens
    assert chunk_budget(scores, 2, 0.7, "floor") == 3  # floor(2.1) = 2 chunks: the last two, 1 + 2
    assert chunk_budget(scores, 2, 0.2, "floor") == 1  # max(1, floor(0.6)): always one chunk
    # kvpress's count: int(n_chunks * (1 - cr)) with cr = 1 - keep in float (100 chunks, keep 0.1: 9, not 10)
    flat = torch.arange(200.0)[None]
    assert chunk_budget(flat, 2, 0.1, "kvpress") == 9 * 2 and chunk_budget(flat, 2, 0.1, "floor") == 10 * 2
    # fewer tokens than one chunk: the base's per-head n_keep
    assert chunk_budget(scores, 8, 0.5, "floor") == 2


def test_every_head_keeps_the_same_whole_chunks():
    # head 0 alone would keep tokens 0 and 5; the head-summed chunk means (chunks of 2) are 3, 1.25, 2.6
    scores = [[10.0, 0.0, 0.0, 0.0, 0.0, 9.0], [1.0, 1.0, 2.0, 2.0, 1.2, 1.2]]
    budgets, kept = plan(scores, 2, 0.5)  # 3 chunks, keep 1: chunk 0
    assert budgets == [2, 2] and kept == [[0, 1], [0, 1]]
    budgets, kept = plan(scores, 2, 0.7)  # keep 2: chunks 0 and 2
    assert budgets == [4, 4] and kept == [[0, 1, 4, 5], [0, 1, 4, 5]]


def test_equal_chunks_keep_the_earlier_one_whole():
    budgets, kept = plan([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]], 2, 0.5)  # chunks 0 and 1 tie, one is kept
    assert kept == [[0, 1]]


def test_another_allocator_cuts_the_last_chunk_by_score():
    # uniform budget 3 (keep 0.5 of 6): the best chunk whole (chunk 2: 5, 6), then the best token of chunk 1
    budgets, kept = plan([[0.0, 0.0, 1.0, 3.0, 5.0, 6.0]], 2, 0.5, allocator=UniformAllocator())
    assert budgets == [3] and kept == [[3, 4, 5]]


def test_short_prompt_falls_back_to_the_base_per_head():
    budgets, kept = plan([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]], 4, 0.67)  # 3 tokens < one chunk of 4
    assert budgets == [2, 2] and kept == [[0, 2], [1, 2]]


def test_window_larger_than_the_budget_keeps_its_best_chunks():
    # the last 6 tokens are protected (n_recent 6): with chunks of 2 they are chunks 1..3, all at max + 1, tied;
    # keep 1 of 4 chunks: the earliest tied one, chunk 1, kept whole (not an arbitrary 2 of the 6 protected)
    budgets, kept = plan([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], 2, 0.25, selector=Selector(n_recent=6))
    assert budgets == [2] and kept == [[2, 3]]


def test_select_keeps_the_best_protected_tokens_when_the_budget_is_short():
    scores = torch.tensor([[9.0, 8.0, 1.0, 4.0, 2.0, 3.0]])
    assert select(scores, torch.tensor([2]), n_recent=4).tolist() == [[3, 5]]  # best 2 of the last 4
    assert select(scores, torch.tensor([5]), n_recent=4).tolist() == [[0, 2, 3, 4, 5]]  # all 4 + the best other


def test_config_and_preset():
    m = methods.load("chunkkv")
    assert m.name == "chunkkv(snapkv)" and m.scorer.chunk_length == 10 == m.allocator.chunk_length
    m = methods.load("chunkkv", preset="kvpress")
    assert (m.scorer.chunk_length, m.allocator.chunk_length, m.scorer.base.window, m.selector.n_recent) == (20, 20, 64, 64)
    m = methods.load("chunkkv", "scorer.chunk_length=5", "scorer.base=knorm")
    assert m.allocator.chunk_length == 5 and m.name == "chunkkv(knorm)"
    m = methods.load("chunkkv", allocator="uniform")
    assert m.name == "chunkkv(snapkv)+uniform"


def test_entropy_gated_spiky_chunk_keeps_its_best_tokens():
    from methods.chunkkv import EntropyGatedChunkKVScorer, chunk_entropies

    # chunks of 4: A = 10 0 0 0 (mean 2.5, entropy 0), B = 2 2 2 2 (mean 2, entropy 1), C = 1 .9 .8 .6 (mean .825,
    # entropy just below 1). Medians: score 2 -> A and B important; entropy C's -> only A spiky.
    row = [10.0, 0, 0, 0, 2, 2, 2, 2, 1, 0.9, 0.8, 0.6]
    entropy = chunk_entropies(torch.tensor(row), 4)
    assert entropy[0] < 1e-6 and entropy[1] == 1.0 and 0.98 < entropy[2] < 1.0
    scorer = EntropyGatedChunkKVScorer(base=Fixed([row]), chunk_length=4, low_entropy_length=1)
    method = Method("m", scorer, UniformAllocator(), Selector())
    inputs = LayerInputs(0, 1, torch.zeros(1, 1, 12, 2), torch.zeros(1, 1, 12, 2), torch.zeros(1, 1, 12, 2), None,
                         torch.Generator())
    # budget 6: A keeps only its best token (0), B whole (4..7), the last one from C (8); plain ChunkKV would keep
    # A whole and 2 tokens of B
    budgets, kept = method.plan([scorer.score(inputs)], 0.5)
    assert budgets.tolist() == [[6]] and kept[0].tolist() == [[0, 4, 5, 6, 7, 8]]
    assert plan([row], 4, 0.5, allocator=UniformAllocator())[1] == [[0, 1, 2, 3, 4, 5]]


def test_entropy_gated_config():
    m = methods.load("entropy_chunkkv")
    assert m.name == "entropy_chunkkv(snapkv)" and (m.scorer.chunk_length, m.scorer.low_entropy_length) == (10, 4)
    m = methods.load("entropy_chunkkv", preset="kvpress")
    assert (m.scorer.chunk_length, m.scorer.base.window, m.selector.n_recent) == (10, 64, 64)
    import pytest
    from harness.errors import KvbenchError

    with pytest.raises(KvbenchError, match="low_entropy_length=10 must be smaller"):
        methods.load("entropy_chunkkv", "scorer.low_entropy_length=10")
