"""GemFilter (methods/gemfilter.py): the selection rule by hand and on 12 cases of the official code, a filter pass
that stops at the filter layer and a second prefill that sees only the k selected tokens (sequence lengths counted
in forward hooks), that second prefill equal to a plain forward of the selected tokens at 0 .. k - 1 (so decoding
equals generate on them), keep 1.0 equal to the full cache, runs through the runner on the reference model and every
tiny-random family, and the refusals."""
import json
from pathlib import Path

import pytest
import torch
from conftest import refused_in_process
from test_pipeline import generate
from transformers import DynamicCache

import methods
from harness.attention import install
from harness.compat import cache_of, with_cache
from harness.compress import Scorer, n_keep
from harness.errors import KvbenchError
from harness.models import build_tiny
from harness.pipeline import decode, prefill, run_sample
from methods.gemfilter import default_filter_layer, gem_scores, gem_select

ROOT = Path(__file__).resolve().parent.parent
PROMPT = torch.randint(3, 250, (80,), generator=torch.Generator().manual_seed(3)).tolist()
N_LAYERS = 6


@pytest.fixture(scope="module")
def llama6():
    return build_tiny("llama", num_hidden_layers=N_LAYERS)


# ---- the rule by hand ------------------------------------------------------------------------------------------
def test_scores_and_selection_by_hand():
    # 2 query heads on 1 KV head, d = 2: q0 = (1, 0), q1 = (0, 1), so the head sum is k . (1, 1) = a + b per token.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[[0.0, 0.0], [5.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 10.0]]])
    # sums s = 0, 5, 0, 1, 0, 10. Kernel 1: no pooling; top 3 = tokens 5, 1, 3 in prompt order.
    assert gem_scores(q, keys, 1).tolist() == [0, 5, 0, 1, 0, 10]
    assert gem_select(gem_scores(q, keys, 1), 3).tolist() == [1, 3, 5]
    # Kernel 3, zero padding counted: (s[t-1] + s[t] + s[t+1]) / 3 = 5/3, 5/3, 2, 1/3, 11/3, 10/3.
    assert gem_scores(q, keys, 3).tolist() == pytest.approx([5 / 3, 5 / 3, 2, 1 / 3, 11 / 3, 10 / 3])
    assert gem_select(gem_scores(q, keys, 3), 3).tolist() == [2, 4, 5]
    # Kernel 5 (the default): sums of 5 around t over 5 = 1, 1.2, 1.2, 3.2, 2.2, 2.2: token 3 wins on its
    # neighbours, though its own score is 1.
    assert gem_scores(q, keys, 5).tolist() == pytest.approx([1, 1.2, 1.2, 3.2, 2.2, 2.2])
    assert gem_select(gem_scores(q, keys, 5), 1).tolist() == [3]
    # The selector's protected tokens are inside k; k is clipped to [1, T].
    assert gem_select(gem_scores(q, keys, 1), 2, n_sink=1).tolist() == [0, 5]
    assert gem_select(gem_scores(q, keys, 1), 9).tolist() == list(range(6))


def test_query_heads_read_their_own_kv_head():
    # 4 query heads on 2 KV heads (GQA groups of 2): heads 0, 1 read KV head 0, heads 2, 3 KV head 1.
    q = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    keys = torch.tensor([[[0.0], [0.0], [3.0], [0.0]], [[9.0], [0.0], [0.0], [0.0]]])
    assert gem_scores(q, keys, 1).tolist() == [0, 0, 6, 0]  # 2 x KV head 0; interleaved heads would pick token 0
    assert gem_select(gem_scores(q, keys, 1), 1).tolist() == [2]


def test_selection_equals_the_official_code():
    # 12 cases from GemFilter's own standard_dis_index as find_context calls it (tools/official/
    # dump_gemfilter_selection.py; the fixture names the official commit)
    fixture = json.loads((ROOT / "tests/fixtures/gemfilter/selection.json").read_text())
    assert fixture["source"].startswith("SalesforceAIResearch/GemFilter@") and len(fixture["cases"]) == 12
    for case in fixture["cases"]:
        scores = gem_scores(torch.tensor(case["last_query"]), torch.tensor(case["keys"]), fixture["kernel"])
        assert gem_select(scores, case["k"]).tolist() == case["selected"], case["name"]


def test_default_filter_layer_scales_with_depth():
    assert [default_filter_layer(n) for n in (32, 40, 28, 8, 4, 2, 1)] == [13, 16, 11, 3, 2, 1, 0]
    assert methods.load("gemfilter", filter_layer=99).scorer.resolved(4) == 3


# ---- the two passes ----------------------------------------------------------------------------------------
class _Recorder(Scorer):
    """Keeps one layer's queries and keys of an ordinary full prefill."""

    def __init__(self, layer):
        self.layer, self.seen = layer, None

    def score(self, inputs):
        if inputs.layer_idx == self.layer:
            self.seen = (inputs.queries.clone(), inputs.keys.clone())
        return None


def _count_lengths(model):
    """Forward pre-hooks recording the sequence length each decoder layer and each MLP is called with."""
    calls = {"layer": [], "mlp": []}
    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw: calls["layer"].append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True))
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, a: calls["mlp"].append(a[0].shape[1])))
    return calls, handles


def test_filter_pass_stops_at_its_layer_and_the_second_prefill_sees_k_tokens(llama6):
    model, _ = llama6
    t, ratio = len(PROMPT), 0.25
    k, f = n_keep(t, ratio), default_filter_layer(N_LAYERS)
    m = methods.load("gemfilter")
    calls, handles = _count_lengths(model)
    try:
        with install(model) as hooks:
            pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=ratio)
    finally:
        for h in handles:
            h.remove()
    # the filter pass enters layers 0 .. f with all T tokens and runs no MLP from layer f on (its attention is
    # cut at the scoring); the second prefill runs every layer on k tokens
    assert f == 2 and calls["layer"] == [t] * (f + 1) + [k] * N_LAYERS
    assert calls["mlp"] == [t] * f + [k] * N_LAYERS
    assert [layer.keys.shape[-2] for layer in pre.cache.layers] == [k] * N_LAYERS
    assert pre.extras == {"gemfilter_layer": f, "gemfilter_selected": k} and pre.next_position == k
    assert pre.n_tokens == t and all(s is None for s in pre.scores)  # kept whole: nothing else is evicted
    idx = m.scorer.last_selected
    kept = m.scorer.prefill_kept()  # every layer holds the selected prompt indices (evidence retention reads them)
    assert len(kept) == N_LAYERS and all(torch.equal(p, idx[None]) for p in kept)
    # the selection is the rule applied to layer f's queries and keys of an ordinary full prefill
    rec = _Recorder(f)
    with install(model) as hooks, torch.no_grad(), hooks.scoring(rec, 0):
        model(input_ids=torch.tensor([PROMPT]), position_ids=torch.arange(t)[None], use_cache=False)
    q, keys = rec.seen
    want = gem_select(gem_scores(q[0, :, -1], keys[0], 5), k)
    assert torch.equal(idx, want) and not torch.equal(idx, torch.arange(k))


def test_second_prefill_is_a_plain_forward_of_the_selected_tokens(llama6):
    # Renumbered positions (the official code's): GemFilter's cache, logits and decoding equal transformers' own
    # forward and generate on the selected ids alone.
    model, tok = llama6
    m = methods.load("gemfilter")
    with install(model) as hooks:
        pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=0.3)
    selected = [PROMPT[i] for i in m.scorer.last_selected.tolist()]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([selected]), **with_cache(DynamicCache()), use_cache=True)
    for ours, theirs in zip(pre.cache.layers, cache_of(ref).layers):
        assert torch.allclose(ours.keys, theirs.keys, atol=1e-5)
        assert torch.allclose(ours.values, theirs.values, atol=1e-5)
    assert torch.allclose(pre.last_logits, ref.logits[:, -1], atol=1e-5)
    model.generation_config.eos_token_id = None
    eos, tok.eos_token_id = tok.eos_token_id, None
    try:
        with install(model):
            ours = decode(model, pre.cache, [], pre.last_logits, pre.next_position, 10, tok, [])
    finally:
        tok.eos_token_id = eos
    assert ours.token_ids == generate(model, selected, 10)


def test_keep_everything_equals_the_full_cache(llama6):
    model, tok = llama6
    model.generation_config.eos_token_id = None
    eos, tok.eos_token_id = tok.eos_token_id, None
    try:
        with install(model) as hooks:
            (out,) = run_sample(model, tok, hooks, methods.load("gemfilter"), PROMPT[:-6], PROMPT[-6:], [1.0], True,
                                12, [], 0, keep_indices=True)
    finally:
        tok.eos_token_id = eos
    assert out.kept_tokens == len(PROMPT) and out.extras["gemfilter_selected"] == len(PROMPT)
    assert out.prediction == tok.decode(generate(model, PROMPT, 12), skip_special_tokens=True)


def test_query_agnostic_questions_decode_after_the_selection(llama6):
    # the question comes after compression: it is fed at positions k .. k + len - 1, after the k cached tokens
    model, tok = llama6
    ctx, question, ratio = PROMPT[:-6], PROMPT[-6:], 0.5
    m = methods.load("gemfilter")
    model.generation_config.eos_token_id = None
    eos, tok.eos_token_id = tok.eos_token_id, None
    try:
        with install(model) as hooks:
            (out,) = run_sample(model, tok, hooks, m, ctx, question, [ratio], False, 8, [], 0)
    finally:
        tok.eos_token_id = eos
    selected = [ctx[i] for i in m.scorer.last_selected.tolist()]
    assert len(selected) == n_keep(len(ctx), ratio) == out.kept_tokens
    assert out.prediction == tok.decode(generate(model, selected + question, 8), skip_special_tokens=True)


# ---- through the runner ------------------------------------------------------------------------------------
def _run(tmp_path, *overrides):
    from harness.io import read_rows
    from harness.overrides import Composer
    from harness.runner import run

    with Composer(ROOT / "conf", "config") as composer:
        cfg = composer.compose(["method=gemfilter", "task=ruler/niah_single_1", "n_samples=1", "max_new_tokens=4",
                                "keep_ratio=[0.25]", "progress=false", *overrides])
    run(cfg, tmp_path)
    return read_rows(tmp_path / "predictions.jsonl")[0]


@pytest.mark.parametrize("model", ["reference", "llama", "qwen2", "qwen3", "mistral"])
def test_runs_record_the_filter_layer(tmp_path, model):
    size = ["model=reference", "context_length=512"] if model == "reference" else [
        "model=tiny-random", f"model.family={model}", "context_length=512"]
    (row,) = _run(tmp_path, *size)
    n_layers = 4 if model == "reference" else 2
    k = n_keep(row["context_tokens"], 0.25)
    assert row["gemfilter_layer"] == default_filter_layer(n_layers) == (2 if model == "reference" else 1)
    assert row["gemfilter_selected"] == k == row["kept_tokens"]
    assert row["kv_bytes"] * row["context_tokens"] == row["kv_bytes_full"] * k  # k tokens in every layer and head
    assert isinstance(row["prediction"], str) and row["prefill_s"] > 0


def test_refusals(capsys, tmp_path, llama6):
    run_dir = tmp_path / "run"
    for args, msg in [(["method.rerotate_keys=true"], "nothing to re-rotate"),
                      (["method.prefill_chunk=32"], "method.prefill_chunk"),
                      (["method.scorer.filter_layer=-1"], "method.scorer.filter_layer"),
                      (["method.scorer.kernel=0"], "method.scorer.kernel")]:
        line = refused_in_process(capsys, "method=gemfilter", *args, "model=tiny-random", "n_samples=1",
                                  f"hydra.run.dir={run_dir}")
        assert msg in line and not run_dir.exists(), line
    # kvbench.compress prunes the user's own forward: GemFilter, which prefills other tokens, says so
    import kvbench

    model, _ = llama6
    with pytest.raises(KvbenchError, match="kvbench.compress"):
        with kvbench.compress(model, kvbench.method("gemfilter", keep_ratio=0.25)), torch.no_grad():
            model(torch.tensor([PROMPT]), **with_cache(DynamicCache()), use_cache=True)
    # and the model is left as it was
    assert not model.get_decoder()._forward_hooks and not model.get_decoder()._forward_pre_hooks
