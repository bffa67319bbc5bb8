"""Kept indices on hand-made tensors, for the selector and every scorer of the slice."""
import math

import pytest
import torch
from conftest import layer_inputs

import methods
from harness.compress import UniformAllocator, n_keep, protect, select


def method(name, **overrides):
    return methods.load(name, **overrides)


def kept(m, inputs, ratio):
    scores = m.scorer.score(inputs)
    _, idx = m.plan([scores], ratio)
    return idx[0]


def test_n_keep_floors_like_kvpress():
    assert n_keep(100, 0.29) == 29  # 100 * 0.29 = 28.999999999999996 in floats
    assert n_keep(10, 0.25) == 2
    assert n_keep(10, 1.0) == 10
    assert n_keep(3, 0.01) == 1  # never an empty head


def test_select_protects_sinks_and_recent_inside_budget():
    scores = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0, 2.0]])
    assert select(scores, torch.tensor([3]), n_sink=1, n_recent=1).tolist() == [[0, 1, 5]]
    assert select(scores, torch.tensor([3])).tolist() == [[1, 2, 3]]
    p = protect(scores, 2, 0)
    assert math.isinf(p[0, 0]) and math.isinf(p[0, 1]) and p[0, 2] == 8.0


def test_select_ragged_heads():
    scores = torch.tensor([[5.0, 1.0, 4.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    idx = select(scores, torch.tensor([1, 3]))
    assert [t.tolist() for t in idx] == [[0], [1, 2, 3]]


def test_uniform_allocator():
    b = UniformAllocator().budgets([torch.zeros(2, 10)] * 3, 0.25)
    assert b.tolist() == [[2, 2]] * 3


def test_streaming_llm_keeps_sinks_and_latest():
    keys = torch.randn(1, 2, 10, 4)
    m = method("streaming_llm")
    assert kept(m, layer_inputs(torch.randn(1, 4, 10, 4), keys), 0.5).tolist() == [[0, 1, 2, 3, 9]] * 2


def test_knorm_keeps_smallest_key_norms():
    norms = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0])
    keys = torch.zeros(1, 1, 6, 2)
    keys[0, 0, :, 0] = norms
    m = method("knorm")
    assert kept(m, layer_inputs(torch.randn(1, 2, 6, 2), keys), 0.5).tolist() == [[1, 3, 5]]


def test_random_is_seeded_and_respects_budget():
    keys = torch.randn(1, 2, 20, 4)
    m = method("random")
    a = kept(m, layer_inputs(torch.randn(1, 2, 20, 4), keys, seed=3), 0.25)
    b = kept(m, layer_inputs(torch.randn(1, 2, 20, 4), keys, seed=3), 0.25)
    c = kept(m, layer_inputs(torch.randn(1, 2, 20, 4), keys, seed=4), 0.25)
    assert a.shape == (2, 5) and torch.equal(a, b) and not torch.equal(a, c)


def _peaked(n_tokens, target, n_q_heads=2, n_kv=1, dim=4, n_queries=None):
    """Keys are one-hot-ish; every query points at key ``target`` so attention peaks there."""
    keys = torch.zeros(1, n_kv, n_tokens, dim)
    keys[..., :, 1] = 1.0
    keys[..., target, 0] = 10.0
    queries = torch.zeros(1, n_q_heads, n_queries or n_tokens, dim)
    queries[..., 0] = 4.0
    return queries, keys


def test_tova_keeps_what_the_last_query_attends():
    q, k = _peaked(8, target=2)
    m = method("tova")  # the last token is always kept, as TOVA and kvpress do
    assert kept(m, layer_inputs(q, k), 0.25).tolist() == [[2, 7]]


def test_snapkv_window_kept_and_peak_chosen():
    q, k = _peaked(16, target=3)
    m = method("snapkv", window=4, kernel=1, n_recent=4)
    assert kept(m, layer_inputs(q, k), 5 / 16).tolist() == [[3, 12, 13, 14, 15]]


def test_snapkv_pooling_keeps_neighbours():
    # With max-pool kernel 3 the peak's neighbours share its score, so they outrank other tokens.
    q, k = _peaked(16, target=5)
    m = method("snapkv", window=2, kernel=3, n_recent=2)
    assert kept(m, layer_inputs(q, k), 5 / 16).tolist() == [[4, 5, 6, 14, 15]]


def test_h2o_column_sums_by_hand():
    # Zero queries attend uniformly to the keys they see: the query at position p gives 1/(p+1) to each.
    keys = torch.randn(1, 1, 4, 2)
    queries = torch.zeros(1, 1, 4, 2)
    scores = method("h2o").scorer.score(layer_inputs(queries, keys))
    expected = torch.tensor([1 + 1 / 2 + 1 / 3 + 1 / 4, 1 / 2 + 1 / 3 + 1 / 4, 1 / 3 + 1 / 4, 1 / 4])
    assert torch.allclose(scores[0, 0], expected, atol=1e-6)


def test_h2o_splits_budget_between_heavy_and_recent():
    keys = torch.randn(1, 1, 10, 2)
    queries = torch.zeros(1, 1, 10, 2)
    m = method("h2o")  # recent_share 0.5: of 4 kept, 2 recent and 2 heaviest (the earliest here)
    assert kept(m, layer_inputs(queries, keys), 0.4).tolist() == [[0, 1, 8, 9]]


def test_gqa_scores_average_the_group():
    # Query heads 0,1 belong to KV head 0 and 2,3 to KV head 1 (repeat_kv's layout).
    keys = torch.zeros(1, 2, 6, 4)
    keys[..., 1] = 1.0
    keys[0, 0, 1, 0] = 10.0
    keys[0, 1, 4, 0] = 10.0
    queries = torch.zeros(1, 4, 6, 4)
    queries[..., 0] = 4.0
    m = method("snapkv", window=1, kernel=1, n_recent=0)
    assert kept(m, layer_inputs(queries, keys), 1 / 6).tolist() == [[1], [4]]


def test_unknown_parameter_is_refused():
    from harness.errors import KvbenchError

    with pytest.raises(KvbenchError, match="nope=1: not a key of scorer 'snapkv', allocator 'uniform'"):
        method("snapkv", nope=1)
    cfg = methods.config("snapkv")
    cfg["scorer"]["windw"] = 3  # a part's unknown key: named with the part and its valid keys
    with pytest.raises(KvbenchError, match=r"method.scorer.windw .*did you mean window\? \(keys: window, kernel, pool\)"):
        methods.build_method(cfg)
    with pytest.raises(KvbenchError, match=r"method.window .*did you mean method.scorer.window\?"):
        methods.build_method({**methods.config("snapkv"), "window": 3})  # the flat spelling of before
    with pytest.raises(KvbenchError, match="allowed: kvpress"):
        method("snapkv", preset="other")


def test_kvpress_preset_sets_window_kernel_pool():
    m = method("snapkv", preset="kvpress")
    assert (m.scorer.window, m.scorer.kernel, m.scorer.pool, m.selector.n_recent) == (64, 5, "avg", 64)


def test_evidence_retention_by_hand():
    from harness.compress import evidence_retention

    # Evidence tokens 2 and 5. Layer 0 kept whole; layer 1 dense: head 0 keeps both, head 1 keeps only 5;
    # layer 2 ragged: head 0 keeps none, head 1 keeps 2.
    kept = [None, torch.tensor([[1, 2, 5], [0, 5, 7]]), [torch.tensor([0, 1]), torch.tensor([2, 3, 4, 6])]]
    overall, by_layer = evidence_retention(kept, [5, 2])
    assert by_layer == [1.0, 0.75, 0.25]
    assert overall == pytest.approx((1.0 + 0.75 + 0.25) / 3)
    assert evidence_retention([None, None], [1])[0] == 1.0  # keep 1.0 keeps all evidence


def test_evidence_char_spans_map_to_tokens():
    from harness.tokenizer import byte_tokenizer
    from tasks.base import PromptEncoder

    enc = PromptEncoder(byte_tokenizer())
    context = "abc KEY=42 def"
    idx = enc.context_token_indices(context, [[8, 10]])  # "42"; token 0 is BOS, so byte i is token i+1
    assert idx == [9, 10]


@pytest.mark.parametrize("n_q, n_kv, n_tokens, dtype", [(4, 2, 300, torch.float32), (2, 2, 129, torch.float32),
                                                          (8, 1, 77, torch.float32), (4, 2, 200, torch.bfloat16)])
def test_prefill_column_sums_equal_the_softmax_matrix_summed(n_q, n_kv, n_tokens, dtype):
    """The fast prefill path (flash pass for each row's log-sum-exp, then exp(q.k*s - lse) over the causal
    triangle) against the attention matrix written out: a causal softmax per query row, summed over the rows."""
    from methods._attention import _prefill_column_sums, attention_column_sums

    gen = torch.Generator().manual_seed(n_tokens)
    q = (torch.randn(1, n_q, n_tokens, 16, generator=gen) * 2).to(dtype)
    k = (torch.randn(1, n_kv, n_tokens, 16, generator=gen) * 2).to(dtype)
    logits = q.float() @ k.float().repeat_interleave(n_q // n_kv, 1).transpose(-1, -2) * 0.25
    logits = logits.masked_fill(torch.ones(n_tokens, n_tokens, dtype=torch.bool).triu(1), float("-inf"))
    want = logits.softmax(dim=-1).sum(dim=2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(attention_column_sums(q, k, 0.25), want, rtol=tol, atol=tol)
    # chunks of a few rows give the same sums as one chunk
    assert torch.allclose(_prefill_column_sums(q, k, 0.25, chunk_elems=n_q * n_tokens * 7), want, rtol=tol, atol=tol)


def test_h2o_prefill_reuses_its_attention_rows_lse_with_the_same_outputs():
    """H2O's prefill computes attention with the fused kernel that returns each row's log-sum-exp: the logits and
    cache are bit for bit the plain prefill's, and the scores equal the ones computed without the reused lse."""
    from harness.attention import install
    from harness.models import build_tiny
    from harness.pipeline import prefill
    from methods._attention import attention_column_sums, per_kv_head

    model, _ = build_tiny("llama")
    ids = torch.randint(3, 250, (140,), generator=torch.Generator().manual_seed(3)).tolist()
    seen = {}
    h2o = method("h2o")
    original = h2o.scorer.score

    def spy(inputs):
        seen[inputs.layer_idx] = inputs
        return original(inputs)

    h2o.scorer.score = spy
    with install(model) as hooks:
        plain = prefill(model, hooks, ids, method("full"), seed=0)
        scored = prefill(model, hooks, ids, h2o, seed=0)
    assert torch.equal(plain.last_logits, scored.last_logits)
    for a, b in zip(plain.cache.layers, scored.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    for layer, inputs in seen.items():
        assert inputs.row_lse is not None and inputs.row_lse.shape == (1, inputs.queries.shape[1], len(ids))
        again = per_kv_head(attention_column_sums(inputs.queries, inputs.keys, inputs.scaling), inputs.keys.shape[1])
        assert torch.allclose(scored.scores[layer], again, atol=1e-5)
