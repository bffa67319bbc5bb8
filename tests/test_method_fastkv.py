"""FastKV: the TSP selection by hand, against FastKV's own update_kv on 12 fixed cases (TSP indices and SnapKV
caches) and against the official formula on a model's TSP-layer eager attention; the shortened deeper layers (the
sequence length and positions each decoder layer saw, keys and logits equal to a masked full-length forward),
SnapKV below the TSP layer, the deeper layers' own SnapKV cut when more tokens go on than the budget, bad values
refused, and rows on the reference model and tiny-random of every family."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import layer_inputs
from test_selection import method
from transformers import DynamicCache

from harness.attention import install
from harness.cache import kept_per_head, prune
from harness.compat import cache_of, with_cache
from harness.compress import Selector, n_keep
from harness.models import FAMILIES, build_tiny
from harness.pipeline import prefill
from methods._layerwise import window_token_scores
from methods.fastkv import default_tsp_layer, tsp_tokens
from methods.snapkv import snap_scores

PROMPT = torch.randint(3, 250, (103,), generator=torch.Generator().manual_seed(1)).tolist()
N_LAYERS = 6


# ---- shared with tests/test_method_pyramidinfer.py -------------------------------------------------------------
def masked_reference(model, ids, tokens_by_layer, attentions=False):
    """A full-length forward in which layer l's queries see only the keys of ``tokens_by_layer[l]`` (None = all;
    every query also sees itself, so no row is empty). The tokens a shortened prefill processes at layer l then
    compute exactly what it computes; the others are ignored. Returns (cache, last logits, attentions or None)."""
    t = len(ids)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    to_bias = lambda allowed: torch.zeros(1, 1, t, t).masked_fill(~allowed, float("-inf"))
    handles = []
    for layer, tokens in zip(model.model.layers, tokens_by_layer):
        allowed = causal
        if tokens is not None:
            keep = torch.zeros(t, dtype=torch.bool)
            keep[tokens] = True
            allowed = causal & (keep[None, :] | torch.eye(t, dtype=torch.bool))
        bias = to_bias(allowed)

        def pre(mod, args, kwargs, bias=bias):
            kwargs["attention_mask"] = bias
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    previous = model.config._attn_implementation
    if attentions:
        model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), **with_cache(DynamicCache()), use_cache=True,
                        attention_mask=to_bias(causal), output_attentions=attentions)
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
    return cache_of(out), out.logits[0, -1], (out.attentions if attentions else None)


def assert_cache_is_reference(cache, ref_cache, prefill_kept):
    """Every layer's keys and values equal the reference's at the original positions it holds (RoPE included:
    equal keys mean the kept tokens kept their positions)."""
    for layer, (ours, ref, held) in enumerate(zip(cache.layers, ref_cache.layers, prefill_kept)):
        for h in range(ours.keys.shape[1]):
            pos = slice(None) if held is None else held[0 if held.shape[0] == 1 else h]
            assert torch.allclose(ours.keys[:, h], ref.keys[:, h, pos], atol=1e-5), (layer, h)
            assert torch.allclose(ours.values[:, h], ref.values[:, h, pos], atol=1e-5), (layer, h)


class SeenBy:
    """Forward hooks on every decoder layer recording the sequence length and positions it really ran on (the
    inputs after the method's pre-hooks)."""

    def __init__(self, model):
        self.lengths, self.positions = {}, {}

        def hook(i):
            def record(mod, args, kwargs, out):
                hidden = args[0] if args else kwargs["hidden_states"]
                self.lengths[i] = hidden.shape[1]
                self.positions[i] = kwargs["position_ids"][0].tolist()
            return record

        self.handles = [layer.register_forward_hook(hook(i), with_kwargs=True)
                        for i, layer in enumerate(model.model.layers)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ---- by hand ------------------------------------------------------------------------------------------------
def test_tsp_tokens_by_hand():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.05])  # six tokens before a window of 3 (T = 9)
    assert tsp_tokens(scores, 9, 5, 3).tolist() == [1, 3, 6, 7, 8]  # top-2 (0.9, 0.8) + the window, in order
    assert tsp_tokens(scores, 9, 6, 3).tolist() == [1, 2, 3, 6, 7, 8]
    assert tsp_tokens(scores, 9, 2, 3).tolist() == [7, 8]  # fewer than the window: its last ones


def test_window_token_scores_by_hand():
    # One KV head, two query heads, D = 1, scaling 1: keys ln 1..ln 4, so a query of 1 at position p attends to
    # token j <= p in proportion to j + 1; a query of 0 attends uniformly. Window of 2 = positions 2 and 3.
    keys = torch.log(torch.arange(1.0, 5.0)).reshape(1, 1, 4, 1)
    queries = torch.stack([torch.ones(4, 1), torch.zeros(4, 1)])[None]
    scores, _ = window_token_scores(layer_inputs(queries, keys), window=2, kernel=1, pool="max")
    # head 1: token 0 gets 1/6 (from p=2) + 1/10 (p=3), token 1 2/6 + 2/10; head 2: 1/3 + 1/4 each; summed.
    want = torch.tensor([1 / 6 + 1 / 10 + 7 / 12, 2 / 6 + 2 / 10 + 7 / 12])
    assert torch.allclose(scores, want)
    pooled, _ = window_token_scores(layer_inputs(queries, keys), window=2, kernel=3, pool="avg")
    assert torch.allclose(pooled, torch.stack([want.sum() / 3, want.sum() / 3]))  # zero padding counted


OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "fastkv" / "selection.json").read_text())


@pytest.mark.parametrize("case", OFFICIAL["cases"], ids=[c["name"] for c in OFFICIAL["cases"]])
def test_selection_equals_the_official_update_kv(case):
    # tests/fixtures/fastkv/selection.json: dongwonjo/FastKV's own FastKVCluster.update_kv on these queries and
    # keys (tools/official/dump_fastkv_selection.py): its TSP indices, and each head's SnapKV cache at the
    # capacity (None where max-pooling ties at the cut)
    window, kernel, capacity, n_tsp = case["window"], case["kernel"], case["capacity"], case["tsp_length"]
    pool = {"avgpool": "avg", "maxpool": "max"}[case["pooling"]]
    keys = torch.tensor(case["keys"])[None]
    last = torch.tensor(case["window_queries"])
    queries = torch.cat([torch.zeros(last.shape[0], keys.shape[2] - window, last.shape[-1]), last], dim=1)[None]
    inputs = layer_inputs(queries, keys)
    token_scores, _ = window_token_scores(inputs, window, kernel, pool)
    assert tsp_tokens(token_scores, keys.shape[2], n_tsp, window).tolist() == case["tsp"]
    scores = snap_scores(inputs, window, kernel, pool)[0]
    cached = Selector(n_recent=window).select(scores, torch.full((keys.shape[1],), capacity))
    for h, want in enumerate(case["cached"]):
        if want is not None:
            assert cached[h].tolist() == sorted(want), h


def test_default_tsp_layer_scales_like_the_official_scripts():
    # 15 of Llama-3.1-8B's 32 (scripts/eval_ruler.sh), 17 of Ministral-8B's 36, 19 of Mistral-Nemo's 40
    # (scripts2/eval_prefill.sh); 2 of the reference model's 4.
    assert [default_tsp_layer(n) for n in (32, 36, 40, 28, 4, 1)] == [15, 17, 19, 13, 2, 0]


# ---- on a model ----------------------------------------------------------------------------------------------
def official_tsp(attn, n_tsp, window, kernel, n_kv):
    """FastKVCluster.update_kv's TSP indices from one layer's eager attention [1, H, T, T] (the official code's
    steps: window rows onto the past summed, max-pooled per head, GQA groups summed, KV heads summed, top-k)."""
    t = attn.shape[-1]
    summed = attn[:, :, -window:, :-window].sum(dim=-2)
    pooled = F.max_pool1d(summed, kernel_size=kernel, padding=kernel // 2, stride=1)
    grouped = pooled.view(1, n_kv, -1, t - window).sum(dim=-2)
    top = grouped.sum(dim=-2).topk(n_tsp - window, dim=-1).indices[0]
    return torch.cat([top, torch.arange(t - window, t)]).sort().values


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tsp_layer_and_deeper_layers_match_the_official_computation(family):
    model, _ = build_tiny(family, num_hidden_layers=N_LAYERS)
    t, ratio, tsp = len(PROMPT), 0.25, 2
    budget = n_keep(t, ratio)
    m = method("fastkv", tsp_layer=tsp)
    with install(model) as hooks, SeenBy(model) as seen:
        pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=ratio)
    idx = m.scorer.layerwise.tokens[tsp + 1]
    # the TSP tokens are the official formula's on the TSP layer's attention (it sees the whole prompt)
    _, _, attentions = masked_reference(model, PROMPT, [None] * N_LAYERS, attentions=True)
    assert torch.equal(idx, official_tsp(attentions[tsp], budget, 8, 7, model.config.num_key_value_heads))
    assert idx.numel() == budget and idx[-8:].tolist() == list(range(t - 8, t))
    # deeper layers really ran on the TSP tokens alone, at their original positions
    assert [seen.lengths[i] for i in range(N_LAYERS)] == [t] * (tsp + 1) + [budget] * (N_LAYERS - tsp - 1)
    assert all(seen.positions[i] == idx.tolist() for i in range(tsp + 1, N_LAYERS))
    assert [layer.keys.shape[-2] for layer in pre.cache.layers] == [t] * (tsp + 1) + [budget] * (N_LAYERS - tsp - 1)
    # keys, values and the last logits are those of a full forward whose deeper layers see only the TSP tokens
    ref_cache, ref_logits, _ = masked_reference(model, PROMPT, [None] * (tsp + 1) + [idx] * (N_LAYERS - tsp - 1))
    assert_cache_is_reference(pre.cache, ref_cache, pre.prefill_kept)
    assert torch.allclose(pre.last_logits[0], ref_logits, atol=1e-5)
    # up to the TSP layer, exactly SnapKV's choice at the budget (window 8, kernel 7, max-pool)
    _, kept = m.plan(pre.scores, ratio)
    snap = method("snapkv", window=8, n_recent=8)
    with install(model) as hooks:
        _, kept_snap = snap.plan(prefill(model, hooks, PROMPT, snap, seed=0).scores, ratio)
    assert all(torch.equal(kept[i], kept_snap[i]) for i in range(tsp + 1))
    assert kept[tsp + 1:] == [None] * (N_LAYERS - tsp - 1)  # deeper layers hold the budget already
    assert pre.extras == {"fastkv_layer": tsp, "fastkv_tsp_tokens": budget, "fastkv_kept_by_layer": [budget] * N_LAYERS}


def test_more_tokens_propagated_than_the_budget_are_cut_per_head():
    # tsp_ratio 0.5 of 103 = 51 tokens go on; each deeper layer caches SnapKV's 25 of them per KV head.
    model, _ = build_tiny("mistral", num_hidden_layers=N_LAYERS)
    t, ratio = len(PROMPT), 0.25
    budget, n_tsp = n_keep(t, ratio), n_keep(t, 0.5)
    m = method("fastkv", tsp_layer=1, tsp_ratio=0.5)
    with install(model) as hooks:
        pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=ratio)
    idx = m.scorer.layerwise.tokens[2]
    assert idx.numel() == n_tsp
    for layer in range(2, N_LAYERS):
        held = pre.prefill_kept[layer]
        assert held.shape == (model.config.num_key_value_heads, budget)
        assert bool(torch.isin(held, idx).all()) and held[:, -8:].eq(torch.arange(t - 8, t)).all()
    assert not torch.equal(pre.prefill_kept[2][0], pre.prefill_kept[2][1])  # per head
    ref_cache, ref_logits, _ = masked_reference(model, PROMPT, [None] * 2 + [idx] * (N_LAYERS - 2))
    assert_cache_is_reference(pre.cache, ref_cache, pre.prefill_kept)
    assert torch.allclose(pre.last_logits[0], ref_logits, atol=1e-5)
    _, kept = m.plan(pre.scores, ratio)
    lengths = [h[0] for h in kept_per_head(prune(pre.cache, kept))]
    assert lengths == pre.extras["fastkv_kept_by_layer"] == [budget] * N_LAYERS
    assert pre.extras["fastkv_tsp_tokens"] == n_tsp


def test_short_prompt_drops_nothing():
    model, _ = build_tiny("llama", num_hidden_layers=4)
    m = method("fastkv")
    with install(model) as hooks:
        pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=1.0)
    assert pre.extras["fastkv_layer"] == -1 and pre.prefill_kept == [None] * 4
    assert [layer.keys.shape[-2] for layer in pre.cache.layers] == [len(PROMPT)] * 4


# ---- rows ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_and_rows_record_the_tsp_layer(family):
    from harness.pipeline import run_sample

    model, tok = build_tiny(family, num_hidden_layers=4)
    ctx, question = PROMPT[:96], PROMPT[96:]
    with install(model) as hooks:
        out, = run_sample(model, tok, hooks, method("fastkv"), ctx, question, [0.25], True, 1, [], 0)
    budget = n_keep(len(PROMPT), 0.25)
    assert out.extras == {"fastkv_layer": 2, "fastkv_tsp_tokens": budget, "fastkv_kept_by_layer": [budget] * 4}
    assert out.kept_tokens == budget and out.prefill_s > 0


def test_rows_on_the_reference_model(tmp_path):
    from test_every_config import compose

    from harness.io import read_rows
    from harness.runner import run

    cfg = compose("method=fastkv", "model=reference", "task=ruler/niah_single_1", "context_length=256",
                  "n_samples=1", "keep_ratio=[0.25,1.0]", "max_new_tokens=2", "progress=false")
    run(cfg, tmp_path)
    rows = {r["keep_ratio"]: r for r in read_rows(tmp_path / "predictions.jsonl")[0]}
    low, full = rows[0.25], rows[1.0]
    budget = n_keep(low["context_tokens"], 0.25)
    # the reference model's 4 layers: TSP layer round(15 / 32 * 4) = 2, the last layer on the TSP tokens alone
    assert low["fastkv_layer"] == 2 and low["fastkv_tsp_tokens"] == budget
    assert low["fastkv_kept_by_layer"] == [budget] * 4 and low["kept_tokens"] == budget
    assert full["fastkv_layer"] == -1 and full["kv_bytes"] == full["kv_bytes_full"]


def test_bad_values_are_refused_in_one_line(capsys, tmp_path):
    from conftest import refused_in_process

    run_dir = tmp_path / "run"
    for arg, key in [("method.scorer.tsp_ratio=0", "method.scorer.tsp_ratio"),
                     ("method.scorer.tsp_layer=-1", "method.scorer.tsp_layer"),
                     ("method.scorer.pool=min", "method.scorer.pool"),
                     ("method.prefill_chunk=32", "method.prefill_chunk")]:
        line = refused_in_process(capsys, "method=fastkv", arg, "model=tiny-random", "n_samples=1",
                                  f"hydra.run.dir={run_dir}")
        assert key in line and not run_dir.exists(), line
