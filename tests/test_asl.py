"""ASL: the layer-choice rule on hand-made ranks, cache shapes after the selection on all four families, a
masked full-forward reference for the shortened prefill (keys at original positions, logits, decoding),
the no-op case (everything selected at layer 0) against generate, and hooks removed afterwards."""
import pytest
import torch
from test_pipeline import generate
from test_selection import method
from transformers import DynamicCache

from harness.attention import install
from harness.cache import kept_per_head, prune
from harness.compat import cache_of, with_cache
from harness.compress import n_keep
from harness.models import build_tiny
from harness.pipeline import decode, prefill, run_sample
from methods.asl import choose_layer, default_lookback, default_start, rank_variance

CTX = torch.randint(3, 250, (96,), generator=torch.Generator().manual_seed(1)).tolist()
QUESTION = torch.randint(3, 250, (7,), generator=torch.Generator().manual_seed(2)).tolist()
PROMPT = CTX + QUESTION
N_LAYERS = 8


@pytest.fixture(scope="module")
def llama8():
    return build_tiny("llama", num_hidden_layers=N_LAYERS)


def R(*ranks):
    return torch.tensor(ranks, dtype=torch.float)


# ---- the rule ------------------------------------------------------------------------------------------------
def test_choose_layer_follows_the_definition():
    # Ranks of 4 context tokens per layer (0 = most attended); k = 2.
    history = [R(0, 1, 2, 3), R(3, 2, 1, 0), R(3, 2, 0, 1), R(3, 2, 0, 1)]
    # V(1): top-2 of layer 1 = tokens 3, 2; ranks over layers 0..1: (3, 0) var 2.25, (2, 1) var 0.25 -> 1.25.
    assert rank_variance(history, 1, 2, 2) == pytest.approx(1.25)
    # V(2): top-2 of layer 2 = tokens 2, 3; over layers 1..2: (1, 0) and (0, 1) -> 0.25; ratio 0.2.
    assert rank_variance(history, 2, 2, 2) == pytest.approx(0.25)
    assert rank_variance(history, 3, 2, 2) == 0.0  # layer 3 repeats layer 2
    assert choose_layer(history, 1, 2, 0.3, 2) == 2  # 0.2 < 0.3
    assert choose_layer(history, 1, 2, 0.2, 2) == 3  # 0.2 is not < 0.2; layer 3's ratio is 0
    assert choose_layer(history, 1, 2, 0.0, 2) == -1  # nothing is below 0: SnapKV fallback
    assert choose_layer(history, 1, 2, 1.5, 2) == 1  # the start layer's ratio is 1 by definition
    # A longer lookback: V(3) over layers 1..3 = tokens 2 (1, 0, 0) and 3 (0, 1, 1): 2/9 each; V(2) over
    # layers 0..2 (clipped at 0): tokens 2 (2, 1, 0) 2/3 and 3 (3, 0, 1) 14/9 -> 10/9; ratio 0.2.
    assert rank_variance(history, 3, 3, 2) == pytest.approx(2 / 9)
    assert rank_variance(history, 2, 3, 2) == pytest.approx(10 / 9)
    assert choose_layer(history, 2, 3, 0.21, 2) == 3 and choose_layer(history, 2, 3, 0.19, 2) == -1
    # Layers before start - lookback + 1 are never read (the prefill does not rank them).
    assert choose_layer([None, None] + history, 3, 2, 0.3, 2) == 4


def test_default_start_and_lookback_scale_with_depth():
    assert (default_start(32), default_lookback(32)) == (10, 8)
    assert (default_start(8), default_lookback(8)) == (3, 2)  # 2.5 rounds up; lookback at least 2
    assert (default_start(2), default_lookback(2)) == (1, 2)


def test_prefill_decision_matches_the_rule(llama8):
    # Record every layer's ranks (threshold 0: no selection), then for thresholds that select layers after the
    # start, the prefill must stop exactly where choose_layer says on the recorded ranks.
    model, tok = llama8
    params = dict(start_layer=2, lookback=4)
    m = method("asl", threshold=0.0, **params)
    with install(model) as hooks:
        prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=0.5)
        s = m.scorer
        assert s.last_selection_layer == -1 and s.row_extras()["asl_layer"] == -1
        assert s.row_extras()["asl_min_ratio"] == round(min(r for lay, r in s.ratios.items() if lay > 2), 6)
        start, lookback = s.resolved(N_LAYERS)
        k, _ = s.split(len(PROMPT))
        assert (start, lookback, k) == (2, 4, n_keep(len(PROMPT), 0.5) - 32)
        assert all(s.rank_history[i] is not None for i in range(N_LAYERS))  # from start - lookback + 1 (< 0) on
        assert sorted(s.ratios) == list(range(start, N_LAYERS)) and s.ratios[start] == 1.0
        chosen = set()
        for threshold in (0.5, 0.9):
            expected = choose_layer(s.rank_history, start, lookback, threshold, k)
            assert expected == min(layer for layer, r in s.ratios.items() if r < threshold)
            m2 = method("asl", threshold=threshold, **params)
            pre = prefill(model, hooks, PROMPT, m2, seed=0, keep_ratio=0.5)
            assert m2.scorer.last_selection_layer == pre.extras["asl_layer"] == expected
            assert pre.extras["asl_kept_tokens"] == n_keep(len(PROMPT), 0.5)
            chosen.add(expected)
    assert len(chosen) == 2 and min(chosen) > start  # the random model gives two distinct later layers


# ---- shapes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_cache_lengths_after_selection_all_families(family):
    model, tok = build_tiny(family, num_hidden_layers=N_LAYERS)
    t, ratio, sel = len(PROMPT), 0.5, 3
    budget = n_keep(t, ratio)
    with install(model) as hooks:
        for early in ("full", "snapkv"):
            m = method("asl", fixed_layer=sel, early_layers=early)
            pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=ratio)
            raw = [layer.keys.shape[-2] for layer in pre.cache.layers]
            assert raw == [t] * sel + [budget] * (N_LAYERS - sel)  # deeper layers cached only the selection
            _, kept = m.plan(pre.scores, ratio)
            lengths = [h[0] for h in kept_per_head(prune(pre.cache, kept))]
            assert lengths == [t if early == "full" else budget] * sel + [budget] * (N_LAYERS - sel)
            idx = m.scorer.last_selected
            assert idx.numel() == budget and bool((idx[1:] > idx[:-1]).all())
            pk = m.scorer.prefill_kept()
            assert pk[:sel] == [None] * sel and all(torch.equal(p[0], idx) for p in pk[sel:])
            assert idx[-32:].tolist() == list(range(t - 32, t))  # the observation window
            assert pre.extras == {"asl_layer": sel, "asl_kept_tokens": budget, "asl_min_ratio": None,
                                  "asl_skipped": round((N_LAYERS - 1 - sel) * (t - budget) / (N_LAYERS * t), 6)}
            if early == "snapkv":  # layers before the selection saw the full prompt: exactly SnapKV's choice
                snap = method("snapkv")
                pre_s = prefill(model, hooks, PROMPT, snap, seed=0)
                _, kept_s = snap.plan(pre_s.scores, ratio)
                for layer in range(sel):
                    assert torch.equal(kept[layer], kept_s[layer])
        # A whole run: rows carry the extras, one prefill per ratio.
        outs = run_sample(model, tok, hooks, method("asl", fixed_layer=sel), CTX, QUESTION, [0.5, 0.75], True, 3,
                          [], 0)
    assert [o.extras["asl_kept_tokens"] for o in outs] == [n_keep(t, 0.5), n_keep(t, 0.75)]
    assert [o.kept_tokens for o in outs] == [n_keep(t, 0.5), n_keep(t, 0.75)]
    assert all(o.prefill_s > 0 for o in outs)


# ---- numerics --------------------------------------------------------------------------------------------------
def _masked_full_forward(model, ids, sel_layer, selected):
    """A full-length forward in which, from layer sel_layer + 1 on, queries see only selected keys (and, for
    unselected queries, themselves, so no row is empty). Selected tokens then compute exactly what the
    shortened prefill computes; unselected ones are ignored."""
    t = len(ids)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    keep = torch.zeros(t, dtype=torch.bool)
    keep[selected] = True
    restricted = causal & (keep[None, :] | torch.eye(t, dtype=torch.bool))
    to_bias = lambda allowed: torch.zeros(1, 1, t, t).masked_fill(~allowed, float("-inf"))
    handles = []
    for i, layer in enumerate(model.model.layers):
        bias = to_bias(restricted if i > sel_layer else causal)

        def pre(mod, args, kwargs, bias=bias):
            kwargs["attention_mask"] = bias
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), **with_cache(DynamicCache()), use_cache=True,
                        attention_mask=to_bias(causal))
    finally:
        for h in handles:
            h.remove()
    return cache_of(out), out.logits[0, -1]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_shortened_prefill_matches_masked_reference(family):
    model, tok = build_tiny(family, num_hidden_layers=6)
    sel, ratio = 2, 0.5
    m = method("asl", fixed_layer=sel, early_layers="full", window=8, n_recent=8)
    with install(model) as hooks:
        pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=ratio)
    idx = m.scorer.last_selected
    assert idx.numel() == n_keep(len(PROMPT), ratio) and not torch.equal(idx[:-8], torch.arange(idx.numel() - 8))
    ref_cache, ref_logits = _masked_full_forward(model, PROMPT, sel, idx)
    for layer, (ours, ref) in enumerate(zip(pre.cache.layers, ref_cache.layers)):
        want_k = ref.keys if layer < sel else ref.keys[:, :, idx]
        want_v = ref.values if layer < sel else ref.values[:, :, idx]
        # Keys carry RoPE: equal keys mean the kept tokens kept their original positions.
        assert torch.allclose(ours.keys, want_k, atol=1e-5), layer
        assert torch.allclose(ours.values, want_v, atol=1e-5), layer
    assert torch.allclose(pre.last_logits[0], ref_logits, atol=1e-5)
    # Decoding on ASL's cache equals decoding on the reference cache cut the same way.
    model.generation_config.eos_token_id = None
    eos = tok.eos_token_id
    tok.eos_token_id = None
    try:
        with install(model):
            _, kept = m.plan(pre.scores, ratio)
            ours = decode(model, prune(pre.cache, kept), [], pre.last_logits, len(PROMPT), 10, tok, [])
            ref_kept = [None] * sel + [idx[None].repeat(2, 1)] * (6 - sel)
            ref = decode(model, prune(ref_cache, ref_kept), [], ref_logits[None], len(PROMPT), 10, tok, [])
    finally:
        tok.eos_token_id = eos
    assert ours.token_ids == ref.token_ids and len(ours.token_ids) == 10


def test_wrong_positions_would_be_caught(llama8):
    # Guard for the test above: the same selection with positions 0..S-1 gives other keys.
    model, tok = llama8
    m = method("asl", fixed_layer=2, early_layers="full")
    with install(model) as hooks:
        pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=0.5)
    idx = m.scorer.last_selected
    ref_cache, _ = _masked_full_forward(model, PROMPT, 2, idx)
    assert torch.allclose(pre.cache.layers[4].keys, ref_cache.layers[4].keys[:, :, idx], atol=1e-5)
    rotary = model.model.rotary_emb
    h = torch.randn(1, idx.numel(), 64)
    good = rotary(h, idx[None])[0]
    bad = rotary(h, torch.arange(idx.numel())[None])[0]
    assert not torch.allclose(good, bad)


def test_everything_selected_at_layer_0_equals_full_cache(llama8):
    model, tok = llama8
    model.generation_config.eos_token_id = None
    ref = generate(model, PROMPT, 12)
    m = method("asl", start_layer=0, threshold=2.0)  # the start layer's ratio (1) is below 2: select at 0
    eos = tok.eos_token_id
    tok.eos_token_id = None
    try:
        with install(model) as hooks:
            pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=1.0)
            assert pre.extras == {"asl_layer": 0, "asl_kept_tokens": len(PROMPT), "asl_skipped": 0.0,
                                  "asl_min_ratio": None}
            _, kept = m.plan(pre.scores, 1.0)
            gen = decode(model, prune(pre.cache, kept), [], pre.last_logits, len(PROMPT), 12, tok, [])
    finally:
        tok.eos_token_id = eos
    assert gen.token_ids == ref


def test_hooks_removed_and_state_cleared(llama8):
    model, tok = llama8
    m = method("asl", fixed_layer=1)
    with install(model) as hooks:
        prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=0.25)
        with pytest.raises(RuntimeError):
            with m.scorer.prefill_patch(model, 0.25):
                raise RuntimeError("boom")  # hooks go away on errors too
    for mod in model.modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks
        assert not any(name.startswith("_kvbench") for name in vars(mod))  # nothing written onto the modules
    assert m.scorer._cache is None and not m.scorer._active
    # The model runs unchanged afterwards.
    with torch.no_grad():
        a = model(input_ids=torch.tensor([PROMPT])).logits
    assert a.shape[1] == len(PROMPT)


def test_selection_layer_attends_only_for_kept_rows():
    # At the selection layer only the kept queries' attention is computed (the others' hidden states are dropped
    # right after); with the selection at the last layer, the last token's logits are still the masked reference's.
    import harness.attention as attention

    model, _ = build_tiny("llama", num_hidden_layers=4)
    sel, ratio = 3, 0.25
    m = method("asl", fixed_layer=sel, early_layers="full", window=8, n_recent=8)
    seen = []
    real = attention.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        seen.append((module.layer_idx, query.shape[2]))
        return real(module, query, *args, **kwargs)

    attention.sdpa_attention_forward = spy
    try:
        with install(model) as hooks:
            pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=ratio)
    finally:
        attention.sdpa_attention_forward = real
    budget = n_keep(len(PROMPT), ratio)
    assert seen == [(0, len(PROMPT)), (1, len(PROMPT)), (2, len(PROMPT)), (3, budget)]
    _, ref_logits = _masked_full_forward(model, PROMPT, sel, m.scorer.last_selected)
    assert torch.allclose(pre.last_logits[0], ref_logits, atol=1e-5)
    # Without the row cut (a scorer that asks for every row) the logits are the same.
    m2 = method("asl", fixed_layer=sel, early_layers="full", window=8, n_recent=8)
    m2.scorer.query_rows = lambda layer_idx: None
    with install(model) as hooks:
        pre2 = prefill(model, hooks, PROMPT, m2, seed=0, keep_ratio=ratio)
    assert torch.allclose(pre.last_logits, pre2.last_logits, atol=1e-5)
    assert torch.equal(pre.cache.layers[sel].keys, pre2.cache.layers[sel].keys)
