"""The similarity merge (methods/merging.py) by hand: target by key cosine, weight by value norms, the threshold and
fraction gates, and the method through plan and prune."""
import math

import pytest
import torch
from conftest import layer_inputs
from transformers import DynamicCache

import methods
from harness.cache import _dense_layer, cache_bytes, prune
from harness.errors import KvbenchError
from methods.merging import similarity_merge

KEYS = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 1.0]])  # token 1 is closer to token 0 (cos 2/sqrt 5)
VALUES = torch.tensor([[1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
KEPT = torch.tensor([0, 2])


def test_similarity_merge_by_hand():
    # evicted 1 -> target 0 with s = 2 / sqrt(5); w = s * |v_1| / (|v_1| + |v_0|) = s * 3 / 4
    s = 2 / math.sqrt(5)
    w = s * 3 / (3 + 1 + 1e-6)
    merged = similarity_merge(KEYS, VALUES, KEPT, 0.0, 1.0)
    assert merged[0].tolist() == pytest.approx([1 / (1 + w), 3 * w / (1 + w)])
    assert merged[1].tolist() == [5.0, 5.0]  # received nothing: unchanged
    # a threshold above s: nothing merges
    assert torch.equal(similarity_merge(KEYS, VALUES, KEPT, 0.9, 1.0), VALUES[KEPT])
    # a key pointing away from every kept key has weight max(s, 0) = 0: nothing changes
    away = KEYS.clone()
    away[1] = torch.tensor([-1.0, -1.0])
    assert torch.equal(similarity_merge(away, VALUES, KEPT, 0.0, 1.0), VALUES[KEPT])


def test_merge_fraction_keeps_the_most_similar_half():
    # kept {0}; evicted 1..4 with cosines 1, 0.8, 0.6, 0.0 to it; fraction 0.5: the 0.5-quantile of (1, 0.8, 0.6, 0)
    # is 0.7, so tokens 1 and 2 merge, 3 does not (and 4 has weight 0 anyway); equal value norms: w = s / 2
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    values = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, -2.0], [0.0, 2.0], [0.0, 2.0]])
    kept = torch.tensor([0])
    w1, w2 = 1.0 * 2 / (4 + 1e-6), 0.8 * 2 / (4 + 1e-6)
    want = (values[0] + w1 * values[1] + w2 * values[2]) / (1 + w1 + w2)
    assert similarity_merge(keys, values, kept, 0.0, 0.5)[0].tolist() == pytest.approx(want.tolist())
    w3 = 0.6 * 2 / (4 + 1e-6)
    every = (values[0] + w1 * values[1] + w2 * values[2] + w3 * values[3]) / (1 + w1 + w2 + w3)
    assert similarity_merge(keys, values, kept, 0.0, 1.0)[0].tolist() == pytest.approx(every.tolist())


def test_merging_method_prunes_merged_values():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 24, 4), torch.randn(1, 2, 24, 4)
    method = methods.load("merging")  # StreamingLLM's selection: 4 sinks + the most recent
    scores = method.scorer.score(layer_inputs(torch.randn(1, 2, 24, 4), keys, values))
    _, kept = method.plan([scores], 0.5)
    assert kept[0][0].tolist() == [0, 1, 2, 3] + list(range(16, 24))
    cache = DynamicCache()
    cache.layers = [_dense_layer(keys, values)]
    before = values.clone()
    pruned = prune(cache, kept, method.merge)
    assert torch.equal(cache.layers[0].values, before) and cache_bytes(pruned) == 2 * 2 * 12 * 4 * 4
    for head in range(2):
        want = similarity_merge(keys[0, head], values[0, head], kept[0][head], 0.0, 1.0)
        assert torch.equal(pruned.layers[0].values[0, head], want)
        assert torch.equal(pruned.layers[0].keys[0, head], keys[0, head, kept[0][head]])


def test_merging_bad_values():
    for bad in ({"merge_fraction": 0.0}, {"similarity_threshold": 1.5}, {"base": "nope"}):
        with pytest.raises(KvbenchError):
            methods.load("merging", **bad)
