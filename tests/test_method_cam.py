"""CaM (methods/cam.py): the merge by hand, the merge extension point, and what merging must leave alone (the
shared prefill cache, the kept count, the seed's draws)."""
import pytest
import torch
from conftest import layer_inputs
from transformers import DynamicCache

import methods
from harness.cache import _dense_layer, cache_bytes, prune
from harness.compress import Scorer
from harness.errors import KvbenchError
from methods.cam import cam_merge


def test_cam_merge_by_hand():
    # T = 6, one head, values 1..6, kept {0, 3, 4}, window m = 2. Evicted 1 and 2 share the window {3, 4}
    # (mean A = (1 + 3) / 2 = 2): p_1 = 0.5 / 2 = 0.25, p_2 = 2 / 2 = 1. Evicted 5 has no kept token after it.
    values = torch.arange(1.0, 7.0)[:, None]
    kept = torch.tensor([0, 3, 4])
    attn = torch.tensor([1.0, 0.5, 2.0, 1.0, 3.0, 7.0])
    # u_1 = 0.2 < 0.25 and u_2 = 0.9 < 1: both merge, v_3 = 4 + (2 + 3) / 2, v_4 = 5 + (2 + 3) / 2
    both = cam_merge(values, kept, attn, torch.tensor([0.0, 0.2, 0.9, 0.0, 0.0, 0.0]), 2)
    assert both[:, 0].tolist() == [1.0, 6.5, 7.5]
    # u_1 = 0.3 >= 0.25: only token 2 merges
    one = cam_merge(values, kept, attn, torch.tensor([0.0, 0.3, 0.9, 0.0, 0.0, 0.0]), 2)
    assert one[:, 0].tolist() == [1.0, 5.5, 6.5]
    # m = 1: the window is the next kept token only, which receives the whole value
    assert cam_merge(values, kept, attn, torch.zeros(6), 1)[:, 0].tolist() == [1.0, 4.0 + 2 + 3, 5.0]
    # a window cut by the end of the sequence is shared by what remains: evicted 1 -> {4} (kept 0, 4)
    short = cam_merge(values, torch.tensor([0, 4]), torch.tensor([1.0, 3.0, 0, 0, 3.0, 0]), torch.zeros(6), 3)
    assert short[:, 0].tolist() == [1.0, 5.0 + 2]


def test_cam_merge_probability_edge_cases():
    values = torch.tensor([[1.0], [10.0], [100.0]])
    kept = torch.tensor([0, 2])
    # the window (token 2) has zero attention: A_1 / 0 = inf -> p = 1 (merges); 0 / 0 = nan -> p = 0 (does not)
    merged = cam_merge(values, kept, torch.tensor([1.0, 0.5, 0.0]), torch.full((3,), 0.999), 4)
    assert merged[:, 0].tolist() == [1.0, 110.0]
    kept_all = cam_merge(values, kept, torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3), 4)
    assert kept_all[:, 0].tolist() == [1.0, 100.0]


def test_cam_scorer_attention_and_prune():
    # two tokens, one head: query 0 sees key 0 only; query 1 gives key 0 p and key 1 1 - p, so A = (1 + p, 1 - p)
    q = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]]])
    k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    scorer = methods.load("cam").scorer
    scorer.score(layer_inputs(q, k))
    p = torch.tensor(2.0 * 2 ** -0.5).exp() / (torch.tensor(2.0 * 2 ** -0.5).exp() + 1)
    assert scorer.stats[0][0][0].tolist() == pytest.approx([1 + float(p), 1 - float(p)])

    # a whole layer through plan and prune: sinks + recent kept (StreamingLLM), values merged, keys untouched
    torch.manual_seed(0)
    n_tokens = 32
    queries, keys, values = torch.randn(1, 4, n_tokens, 8), torch.randn(1, 2, n_tokens, 8), torch.randn(1, 2, n_tokens, 8)
    method = methods.load("cam")
    scores = method.scorer.score(layer_inputs(queries, keys, values))
    _, kept = method.plan([scores], 0.25)
    assert kept[0].tolist() == [[0, 1, 2, 3, 28, 29, 30, 31]] * 2
    cache = DynamicCache()
    cache.layers = [_dense_layer(keys, values)]
    before = values.clone()
    pruned = prune(cache, kept, method.merge)
    assert torch.equal(cache.layers[0].values, before)  # the shared prefill cache is never written into
    assert cache_bytes(pruned) == 2 * 2 * 8 * 8 * 4  # merging adds no entry: kv_bytes is the kept count
    assert torch.equal(pruned.layers[0].keys, keys[:, :, kept[0][0]])
    attn, uniform = method.scorer.stats[0]
    for head in range(2):
        want = cam_merge(values[0, head], kept[0][head], attn[head], uniform[head], 32)
        assert torch.allclose(pruned.layers[0].values[0, head], want)
    # every middle token's window is the first recent tokens: something merged there, the sinks are unchanged
    assert torch.equal(pruned.layers[0].values[0, :, :4], values[0, :, :4])
    assert not torch.allclose(pruned.layers[0].values[0, :, 4:], values[0, :, 28:])


def test_cam_draws_depend_on_the_seed_only():
    torch.manual_seed(1)
    queries, keys = torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4)
    one, two = methods.load("cam").scorer, methods.load("cam").scorer
    one.score(layer_inputs(queries, keys, seed=3))
    two.score(layer_inputs(queries, keys, seed=3))
    assert torch.equal(one.stats[0][1], two.stats[0][1])
    two.score(layer_inputs(queries, keys, seed=4))
    assert not torch.equal(one.stats[0][1], two.stats[0][1])


def test_cam_ragged_heads_merge_per_head():
    torch.manual_seed(2)
    values = torch.randn(1, 2, 10, 4)
    method = methods.load("cam", base="knorm", n_sink=0)
    method.scorer.score(layer_inputs(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), values))
    kept = [torch.tensor([1, 5, 9]), torch.tensor([0, 2, 4, 6, 8])]
    _, merged = method.merge(0, values, values, kept)
    attn, uniform = method.scorer.stats[0]
    for head, idx in enumerate(kept):
        assert torch.allclose(merged[0, head, idx], cam_merge(values[0, head], idx, attn[head], uniform[head], 32))


def test_merge_is_a_declared_extension_point_doing_nothing_by_default():
    assert "merge" in vars(Scorer)
    bare = type("Bare", (Scorer,), {"score": lambda self, inputs: None})()
    keys, values = torch.zeros(1, 1, 3, 2), torch.ones(1, 1, 3, 2)
    assert bare.merge(0, keys, values, torch.tensor([[0]])) == (keys, values)
    full = methods.load("full")
    assert full.merge(0, keys, values, torch.tensor([[0]])) == (keys, values)


def test_cam_presets_and_bad_values():
    method = methods.load("cam", preset="kvpress")
    assert method.scorer.shared_heads and method.budget_rule == "kvpress"
    for bad in ({"merge_budget": 0}, {"base": "nope"}, {"shared_heads": "maybe"}):
        with pytest.raises(KvbenchError):
            methods.load("cam", **bad)
