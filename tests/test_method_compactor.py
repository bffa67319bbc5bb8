"""Compactor (methods/compactor.py): the non-causal chunked attention by hand (kvpress's padding included), the
blend of its two z-scored parts, the protected ends, blending = the compression ratio, and the preset."""
import math

import pytest
import torch
from conftest import layer_inputs
from test_method_leverage import inputs

import methods
from harness.errors import KvbenchError
from methods._attention import per_kv_head, pool_scores
from methods.compactor import non_causal_chunk_attention
from methods.leverage import layer_zscore, leverage_scores


def test_non_causal_chunk_attention_by_hand():
    # S = 3, chunks of 2, one head, d = 1, no 1/sqrt(d) scale. q = [1, 0, 2], k = [0, 1, 1].
    q = torch.tensor([1.0, 0.0, 2.0])[None, None, :, None]
    k = torch.tensor([0.0, 1.0, 1.0])[None, None, :, None]
    got = non_causal_chunk_attention(q, k, 2)[0, 0].tolist()
    e = math.e
    # chunk {0, 1}: query 0 has logits [0, 1] (key 1 is in its future: no causal mask), query 1 [0, 0]
    key0, key1 = 1 / (1 + e) + 0.5, e / (1 + e) + 0.5
    # chunk {2, pad}: query 2 has logits [2, -1e-9] (kvpress's padded key), the padded query [0, -1e-9]
    key2 = e ** 2 / (e ** 2 + 1) + 0.5
    assert got == pytest.approx([key0, key1, key2], abs=1e-6)
    # GQA: query heads 0, 1 on KV head 0 (repeat_kv layout); each query head's own sums
    q2 = torch.cat([q, 2 * q], dim=1)
    both = non_causal_chunk_attention(q2, k, 2)
    assert both[0, 0].tolist() == pytest.approx(got, abs=1e-6)
    assert both[0, 1].tolist() == pytest.approx(non_causal_chunk_attention(2 * q, k, 2)[0, 0].tolist(), abs=1e-6)


def test_score_is_the_blend_of_two_layer_z_scores_between_the_protected_ends():
    torch.manual_seed(0)
    n_tokens, left, right = 40, 3, 2
    queries, keys, values = torch.randn(1, 4, n_tokens, 8), torch.randn(1, 2, n_tokens, 8), torch.randn(1, 2, n_tokens, 8)
    method = methods.load("compactor", "selector.n_sink=3", "selector.n_recent=2", chunk_size=16,
                          sketch_dimension=None, blending=0.3)
    scores = method.scorer.score(inputs(keys, queries=queries, values=values))
    mid = slice(left, n_tokens - right)
    geometry = layer_zscore(leverage_scores(keys[:, :, mid], None, 0.01))
    attention = per_kv_head(non_causal_chunk_attention(queries[:, :, mid], keys[:, :, mid], 16), 2)
    attention = layer_zscore(pool_scores(attention * values[:, :, mid].norm(dim=-1), 3, "avg"))
    expected = 0.3 * geometry + attention
    assert torch.allclose(scores[:, :, mid], expected, atol=1e-5)
    # the protected ends carry the maximum (kvpress's padding) and the selector keeps them
    top = scores[:, :, mid].max()
    assert scores[:, :, :left].eq(top).all() and scores[:, :, -right:].eq(top).all()
    _, kept = method.plan([scores], 0.25)
    for head in kept[0]:
        assert {0, 1, 2, 38, 39} <= set(head.tolist())


def test_blending_null_is_the_compression_ratio_and_needs_a_prefill_per_ratio():
    torch.manual_seed(1)
    queries, keys = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    default = methods.load("compactor")
    assert default.scorer.blending is None and not default.shares_across_ratios
    with pytest.raises(KvbenchError, match="prefill_patch"):
        default.scorer.score(inputs(keys, queries=queries))
    fixed = methods.load("compactor", blending=0.25).scorer
    assert fixed.shares_across_ratios
    with default.scorer.prefill_patch(None, 0.75):  # keep 0.75 = compression ratio 0.25
        blended = default.scorer.score(inputs(keys, queries=queries))
    assert torch.equal(blended, fixed.score(inputs(keys, queries=queries)))
    with default.scorer.prefill_patch(None, 0.5):
        assert not torch.allclose(default.scorer.score(inputs(keys, queries=queries)), blended)


def test_defaults_are_kvpress_and_the_ends_follow_the_selector():
    method = methods.load("compactor")
    s = method.scorer
    assert (s.sink_size_start, s.sink_size_end, s.chunk_size, s.sketch_dimension, s.ridge) == (8, 4, 256, 48, 0.01)
    assert (method.selector.n_sink, method.selector.n_recent) == (8, 4)
    kv = methods.load("compactor", preset="kvpress")
    assert kv.budget_rule == "kvpress" and kv.scorer.sink_size_start == 8
    short = methods.load("compactor").scorer  # nothing between the ends: every token kept alike
    few = torch.randn(1, 1, 10, 4)
    with short.prefill_patch(None, 0.5):
        assert short.score(inputs(few, queries=few)).eq(1).all()


def test_no_rotary_is_a_one_line_error():
    scorer = methods.load("compactor", blending=0.5).scorer
    with pytest.raises(KvbenchError, match="rotary"):
        scorer.score(layer_inputs(torch.randn(1, 1, 30, 4), torch.randn(1, 1, 30, 4)))
