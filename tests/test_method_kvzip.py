"""KVzip (methods/kvzip.py): the reconstruction score, the replay inputs, the global budgets and the
``Scorer.after_prefill`` extension point, by hand. kvpress conformance: tests/test_conformance_extra.py -k kvzip."""
from __future__ import annotations

import math

import pytest
import torch

import methods
from harness.attention import install
from harness.compress import LayerInputs, Method, Scorer, UniformAllocator
from harness.pipeline import prefill
from harness.tokenizer import byte_tokenizer
from methods.kvzip import (FIRST_PROMPT, KVPRESS_NEXT_PROMPT, NEXT_PROMPT, KVzipScorer, chunks_of, global_budgets,
                           reconstruction_scores, value_output_norms)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    from harness.models import build_tiny

    return build_tiny("llama")


def test_zero_queries_spread_evenly_and_the_max_is_the_first_row():
    # q = 0: every allowed logit is 0, so row r (of n reconstruction tokens) gives 1 / (sink + chunk + r + 1) to
    # each allowed entry (causal: it sees reconstruction tokens 0..r); the max over rows is row 0's.
    n, n_sink, start, end, n_ctx = 3, 2, 4, 9, 10
    queries = torch.zeros(1, 2, n, 4)
    keys = torch.randn(1, 1, n_ctx + n, 4)
    got = reconstruction_scores(queries, keys, n_sink, start, end)
    assert got.shape == (1, 1, end - start)
    assert torch.allclose(got, torch.full((1, 1, 5), 1 / (n_sink + 5 + 1)))


def test_one_query_picks_its_key_and_the_group_max_takes_it():
    # head 1 of the group (query head 1) has a large dot product with chunk key 2 only: that key's probability
    # is exp(10) / (exp(10) + 3 others + 1 itself) in the first row; the other chunk keys keep head 0's 1/5.
    keys = torch.zeros(1, 1, 6 + 1, 2)
    keys[0, 0, 2 + 2] = torch.tensor([1.0, 0.0])  # chunk = cached positions 2..5, its third entry
    queries = torch.zeros(1, 2, 1, 2)
    queries[0, 1, 0] = torch.tensor([10.0 * math.sqrt(2), 0.0])  # logit = 10 after the 1/sqrt(D) scaling
    got = reconstruction_scores(queries, keys, n_sink=0, start=2, end=6)[0, 0]
    e = math.exp(10.0)
    assert torch.allclose(got, torch.tensor([1 / 5, 1 / 5, e / (e + 4), 1 / 5]), atol=1e-6)


def test_the_softmax_sees_only_sinks_chunk_and_replay():
    # A huge logit on a context key outside the chunk and the sinks must not take probability from the chunk.
    keys = torch.zeros(1, 1, 8 + 1, 2)
    keys[0, 0, 1] = torch.tensor([100.0, 0.0])  # position 1: neither sink (n_sink=1 -> position 0) nor chunk
    queries = torch.tensor([[[[1.0, 0.0]]]])
    got = reconstruction_scores(queries, keys, n_sink=1, start=4, end=8)
    assert torch.allclose(got, torch.full((1, 1, 4), 1 / 6))


def test_kvzip_plus_rows_and_columns():
    # rows divided by ||h||, columns times ||W_O v||: with q = 0 and one row, entry j scores col_j / (6 * ||h||).
    queries = torch.zeros(1, 1, 1, 2)
    keys = torch.zeros(1, 1, 5 + 1, 2)
    rows = torch.tensor([[0.5]])
    cols = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]])
    got = reconstruction_scores(queries, keys, n_sink=1, start=1, end=5, row_weight=rows, col_weight=cols)
    assert torch.allclose(got, torch.tensor([[[2.0, 3.0, 4.0, 5.0]]]) * 0.5 / 6)


def test_value_output_norms_by_hand():
    module = torch.nn.Module()
    module.o_proj = torch.nn.Linear(2 * 2, 3, bias=False)  # 2 query heads of dim 2, one KV head
    with torch.no_grad():
        module.o_proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]))
    values = torch.tensor([[[[3.0, 4.0]]]])  # [B, H_kv, n, D]
    got = value_output_norms(module, values)  # head 0: W[:, 0:2] v = (3, 4, 0); head 1: W[:, 2:4] v = (8, 0, 9)
    assert torch.allclose(got, torch.tensor([[[5.0], [math.sqrt(64 + 81)]]]))


def test_chunks_and_replay_ids():
    tok = byte_tokenizer()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    scorer = KVzipScorer(chunk_size=4, overlap=2)
    ids = [tok.bos_token_id] + enc("abcdefghij")  # BOS + 10 context tokens
    n_sys, replays = scorer.replays(ids, tok)
    assert n_sys == 1 and chunks_of(10, 4) == [(0, 4), (4, 8), (8, 10)]
    newline = enc("\n")  # the suffix without a chat template
    assert [(s, e) for s, e, _ in replays] == [(1, 5), (5, 9), (9, 11)]
    assert replays[0][2] == enc(FIRST_PROMPT) + newline + enc("abcd")
    assert replays[1][2] == enc(NEXT_PROMPT) + enc("cd") + newline + enc("efgh")
    assert replays[2][2] == enc(NEXT_PROMPT) + enc("gh") + newline + enc("ij")
    # kvpress's sinks: the BOS is not a system prompt (no template), and kvpress's prompt has no trailing space
    n_sys, replays = KVzipScorer(chunk_size=4, n_sink=4, next_prompt=KVPRESS_NEXT_PROMPT).replays(ids, tok)
    assert n_sys == 0 and replays[0][:2] == (0, 4) and replays[0][2][-4:] == ids[:4]
    assert replays[1][2][:len(enc(KVPRESS_NEXT_PROMPT))] == enc("\n\nRepeat the part of the previous context exactly, starting with")


def test_system_length_follows_a_template_head_only_where_the_prompt_has_it():
    scorer = KVzipScorer()
    assert scorer.system_length([7, 8, 9, 5], [7, 8], bos=1) == 2
    assert scorer.system_length([1, 8, 9, 5], [7, 8], bos=1) == 1  # not chat-formatted: BOS as system prompt
    assert KVzipScorer(n_sink=4).system_length([1, 8, 9, 5], [7, 8], bos=1) == 0


def test_global_budgets_by_hand():
    # 2 layers x 2 heads x 4 tokens, scores 0..15 in order: keep 0.5 -> the top 8 are 8..15 = all of layer 1.
    scores = [torch.arange(0, 8.0).view(2, 4), torch.arange(8, 16.0).view(2, 4)]
    # Layer 0's empty heads get one entry each, taken from the (first) largest budget: the total stays 8.
    assert global_budgets(scores, 0.5, "floor").tolist() == [[1, 1], [3, 3]]
    # keep 0.75 -> 12: 4..15; layer 0 head 1 has 4..7, head 0 none -> one from the first largest (layer 0 head 1)
    assert global_budgets(scores, 0.75, "floor").tolist() == [[1, 3], [4, 4]]
    # per layer: each layer keeps 4 of its 8 (its top: head 1)
    assert global_budgets(scores, 0.5, "floor", scope="layer").tolist() == [[1, 3], [1, 3]]


def test_global_budget_counts_floor_and_kvpress():
    scores = [torch.rand(5, 2, generator=torch.Generator().manual_seed(0)) for _ in range(1)]  # N = 10
    # keep 0.75: floor(7.5) = 7; kvpress prunes int(10 * 0.25) = 2, keeps 8
    assert int(global_budgets(scores, 0.75, "floor").sum()) == 7
    assert int(global_budgets(scores, 0.75, "kvpress").sum()) == 8


def test_after_prefill_leaves_the_cache_and_scores_every_chunk(tiny):
    model, tok = tiny
    ids = tok("the quick brown fox jumps over the lazy dog " * 3).input_ids  # BOS + 132 bytes
    method = methods.build_method(methods.config("kvzip", chunk_size=50))
    with install(model) as hooks:
        plain = prefill(model, hooks, ids, methods.build_method(methods.config("snapkv")), seed=0)
        pre = prefill(model, hooks, ids, method, seed=0)
    for a, b in zip(plain.cache.layers, pre.cache.layers):  # the reconstruction's entries are gone, bit for bit
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(plain.last_logits, pre.last_logits)
    for s in pre.scores:
        assert s.shape == (1, 2, len(ids))
        assert bool(torch.isinf(s[..., 0]).all())  # BOS = the system prompt: never evicted
        assert bool((s[..., 1:] > 0).all() and (s[..., 1:] <= 1).all())  # three chunks, every entry scored


def test_scores_do_not_depend_on_the_chunk_layout_of_one_chunk(tiny):
    # chunk_size >= context: one replay, whatever the size; a smaller chunk changes the scores (other replays)
    model, tok = tiny
    ids = tok("abcdefghijklmnopqrstuvwxyz" * 2).input_ids
    with install(model) as hooks:
        one = [prefill(model, hooks, ids, methods.build_method(methods.config("kvzip", chunk_size=c)), 0).scores
               for c in (60, 2000)]
        two = prefill(model, hooks, ids, methods.build_method(methods.config("kvzip", chunk_size=20)), 0).scores
    assert all(torch.equal(a, b) for a, b in zip(*one))
    assert not all(torch.equal(a, b) for a, b in zip(one[0], two))


class _Probe(Scorer):
    """Scores 1 everywhere during the prefill, then replaces them by the positions after it."""

    def score(self, inputs: LayerInputs):
        return torch.ones(1, inputs.keys.shape[1], inputs.keys.shape[2])

    def after_prefill(self, model, cache, ids):
        self.seen = (len(ids), cache.layers[0].keys.shape[2])
        return [torch.arange(len(ids), dtype=torch.float64).expand(1, layer.keys.shape[1], -1) for layer in cache.layers]


def test_prefill_uses_the_scores_after_prefill_returns(tiny):
    model, tok = tiny
    ids = tok("hello there").input_ids
    method = Method("probe", _Probe(), UniformAllocator())  # not registered: no config of its own
    with install(model) as hooks:
        pre = prefill(model, hooks, ids, method, seed=0)
    assert method.scorer.seen == (len(ids), len(ids))
    assert all(s.dtype == torch.float32 and s[0, 0].tolist() == list(range(len(ids))) for s in pre.scores)
    budgets, kept = method.plan(pre.scores, 0.5)
    assert kept[0][0].tolist() == list(range(len(ids) - len(ids) // 2, len(ids)))  # the later positions win


def test_global_budgets_head_scope_is_uniform():
    scores = [torch.rand(2, 10, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert global_budgets(scores, 0.25, "floor", scope="head").tolist() == [[2, 2]] * 3
    assert global_budgets(scores, 0.75, "kvpress", scope="head").tolist() == [[8, 8]] * 3  # 10 - int(2.5)
