"""The merging methods against kvpress 0.5.5 (fixtures written by tools/conformance/dump_cam.py in kvpress's
environment).

CaM against CAMPress:
the kept set, the cumulative attention and the merged values, through the method's own path (score, plan, prune
with ``Method.merge``), under ``method.preset=kvpress`` with KnormPress's scores as the base (kvpress's CAMPress
needs a base press; knorm is attention-free, so the same on seeded tensors). 12 cases: 3 ratios x merge windows
4 and 32 (the latter longer than some kept sets) x GQA groups 1 and 2.

merging against MergingPress(KnormPress): kept set and blended values, 12 cases: 3 ratios x (threshold, fraction)
(0, 1), (0.3, 1), (0, 0.75), (0.2, 0.5)."""
import json
from pathlib import Path

import pytest
import torch
from conftest import layer_inputs
from transformers import DynamicCache

import methods
from harness.cache import _dense_layer, prune

FIXTURE = Path(__file__).parent / "fixtures" / "kvpress" / "cam.json"
CASES = json.loads(FIXTURE.read_text())["cases"]
MERGING = json.loads(FIXTURE.with_name("merging.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"cr{c['compression_ratio']}-m{c['merge_budget']}-g{c['group']}")
def test_cam_matches_kvpress(case):
    queries, keys, values = (torch.tensor(case[f"{name}_64"], dtype=torch.float32) / 64
                             for name in ("queries", "keys", "values"))
    method = methods.load("cam", preset="kvpress", base="knorm", merge_budget=case["merge_budget"], n_sink=0)
    scores = method.scorer.score(layer_inputs(queries, keys, values, seed=case["seed"]))
    attn, _ = method.scorer.stats[0]
    assert torch.allclose(attn.flatten(), torch.tensor(case["attentions"]), atol=1e-5)
    _, kept = method.plan([scores], 1 - case["compression_ratio"])
    n_kv = keys.shape[1]
    assert kept[0].tolist() == case["kept"] * n_kv  # kvpress: one kept set for every KV head
    cache = DynamicCache()
    cache.layers = [_dense_layer(keys, values)]
    pruned = prune(cache, kept, method.merge).layers[0]
    assert torch.equal(pruned.keys, keys[:, :, kept[0][0]])
    want = torch.tensor(case["merged_values"]).reshape(pruned.values.shape)
    assert torch.allclose(pruned.values, want, atol=1e-5)
    assert not torch.allclose(pruned.values, values[:, :, kept[0][0]], atol=1e-3)  # something did merge


@pytest.mark.parametrize("case", MERGING, ids=lambda c: f"cr{c['compression_ratio']}-t{c['similarity_threshold']}"
                                                        f"-f{c['merge_fraction']}")
def test_merging_matches_kvpress(case):
    keys, values = (torch.tensor(case[f"{name}_64"], dtype=torch.float32) / 64 for name in ("keys", "values"))
    method = methods.load("merging", preset="kvpress", base="knorm", n_sink=0,
                          similarity_threshold=case["similarity_threshold"], merge_fraction=case["merge_fraction"])
    scores = method.scorer.score(layer_inputs(torch.zeros(1, keys.shape[1], *keys.shape[2:]), keys, values))
    _, kept = method.plan([scores], 1 - case["compression_ratio"])
    assert kept[0].tolist() == case["kept"][0]
    cache = DynamicCache()
    cache.layers = [_dense_layer(keys, values)]
    pruned = prune(cache, kept, method.merge).layers[0]
    assert torch.equal(pruned.keys, keys.gather(2, kept[0][None, :, :, None].expand(-1, -1, -1, keys.shape[-1])))
    want = torch.tensor(case["merged_values"]).reshape(pruned.values.shape)
    assert torch.allclose(pruned.values, want, atol=1e-5)
    assert not torch.allclose(pruned.values, values.gather(2, kept[0][None, :, :, None].expand(-1, -1, -1, 8)),
                              atol=1e-3)  # something did merge
