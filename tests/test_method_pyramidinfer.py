"""PyramidInfer: the official prefilling schedule's counts and the budget's decay ratio / per-layer shares by hand,
the solved decay against FastKV's hand-profiled configs, PvC scores by hand, each shrink against the official
formula on the layer's eager attention, the shortened layers (sequence length and positions each decoder layer
saw, keys and logits equal to a masked full-length forward), the budget cut, and rows on every family and on the
reference model."""
import math

import pytest
import torch
from conftest import layer_inputs
from test_method_fastkv import PROMPT, SeenBy, assert_cache_is_reference, masked_reference
from test_selection import method

from harness.attention import install
from harness.cache import kept_per_head, prune
from harness.compress import n_keep
from harness.models import FAMILIES, build_tiny
from harness.pipeline import prefill
from methods.pyramidinfer import budget_plan, decay_schedule, default_interval, pvc_scores, token_counts

N_LAYERS = 6


# ---- by hand ------------------------------------------------------------------------------------------------
def test_token_counts_follow_the_official_schedule():
    # T = 100, recent_ratio 0.2: R = 20, 21 recent tokens, 79 context tokens; L = 4, d = 0.5, min_context 10.
    # s(0) = 1 (no shrink); s(1) = 0.5 * (cos(pi / 4) + 1) / 2 + 0.5 = 0.92678: int(79 * s) = 73;
    # s(2) = 0.75: int(73 * 0.75) = 54. The last layer's shrink has no layer to feed.
    assert decay_schedule(0, 4, 0.5) == 1.0 and decay_schedule(2, 4, 0.5) == 0.75
    assert token_counts(100, 4, 0.5, 0.2, 10, 1) == [100, 100, 21 + 73, 21 + 54]
    assert token_counts(100, 4, 0.5, 0.2, 10, 2) == [100, 100, 100, 21 + int(79 * 0.75)]  # every 2nd layer
    # int(73 * 0.75) = 54 <= min_context 60: no shrink at all after layer 2 (the official "else context_length")
    assert token_counts(100, 4, 0.5, 0.2, 60, 1) == [100, 100, 94, 94]
    assert token_counts(100, 4, 1.0, 0.2, 10, 1) == [100] * 4  # d = 1: s = 1 everywhere


def test_budget_plan_by_hand():
    # budget 90 of 100 on 4 layers: total <= 360. d = 0.352: s(1) = 0.648 * 0.85355 + 0.352 = 0.90510,
    # int(79 * s) = 71; s(2) = 0.676, int(71 * 0.676) = 47 -> 100 + 100 + 92 + 68 = 360. d = 0.353 gives
    # int(71 * 0.6765) = 48 (361 > 360), so 0.352 is the largest d that fits, exactly at the budget.
    plan = budget_plan(100, 4, 90, None, 0.2, 10, 1)
    assert (plan.decay, plan.counts, plan.kept, plan.scaled) == (0.352, [100, 100, 92, 68], [100, 100, 92, 68], False)
    assert sum(budget_plan(100, 4, 91, None, 0.2, 10, 1).counts) <= 364
    # budget 25 (total 100): even d = 0 holds 100 + 100 + 88 + 54 = 342 (s(1) = 0.85355: 67; s(2) = 0.5: 33),
    # so each layer keeps its share 100 * counts / 342 = 29.24, 29.24, 25.73, 15.79, rounded to sum to 100
    # (floors 29, 29, 25, 15; the two largest fractions get one more).
    plan = budget_plan(100, 4, 25, None, 0.2, 10, 1)
    assert (plan.decay, plan.counts, plan.kept, plan.scaled) == (0.0, [100, 100, 88, 54], [29, 29, 26, 16], True)
    # a fixed decay ratio (the configs' 0.9) above the budget is cut the same way: 392 -> 360
    plan = budget_plan(100, 4, 90, 0.9, 0.2, 10, 1)
    assert (plan.counts, plan.kept, sum(plan.kept)) == ([100, 100, 98, 94], [92, 92, 90, 86], 360)
    assert budget_plan(100, 4, 100, None, 0.2, 10, 1).decay == 1.0  # keep everything: no shrink


def test_counts_give_fastkvs_profiled_retention():
    # dongwonjo/FastKV baselines/pyramidinfer/pyramidinfer_configs/llama31_8b_{35,50,60}%.json: decay ratios
    # profiled (profile_pyramidinfer.py, 1000-4000 tokens) to mean-over-layers retention 35 / 50 / 60 % of
    # Llama-3.1-8B's 32 layers; the same counts give those rates here, and the solver finds those ratios back.
    for (decay, recent), rate in (((0.01, 0.01), 0.35), ((0.3, 0.2), 0.5), ((0.7, 0.2), 0.6)):
        held = sum(token_counts(4000, 32, decay, recent, 64, 1)) / (32 * 4000)
        assert abs(held - rate) < 0.01, (decay, held)
    assert abs(budget_plan(8192, 32, 4096, None, 0.2, 64, 1).decay - 0.3) < 0.01
    assert abs(budget_plan(8192, 32, n_keep(8192, 0.6), None, 0.2, 64, 1).decay - 0.7) < 0.02


def test_default_interval_follows_the_official_configs():
    # configs/llama2_7b, llama3_8b (32 layers): 1; llama2_13b (40): 2; llama2_70b, llama3_70b (80): 3
    assert [default_interval(n) for n in (4, 28, 32, 40, 80)] == [1, 1, 1, 2, 3]


def test_pvc_scores_by_hand():
    # One KV head, two query heads, D = 1: keys ln 1..ln 4; head 1 (query 1) attends to j <= p in proportion to
    # j + 1, head 2 (query 0) uniformly. Recent rows p = 2, 3 (weights 1, 1.2); head means: p = 2 -> (0.25, 1/3),
    # p = 3 -> (0.175, 0.225); weighted row means: token 0 (0.25 + 1.2 * 0.175) / 2, token 1 (1/3 + 1.2 * 0.225) / 2.
    keys = torch.log(torch.arange(1.0, 5.0)).reshape(1, 1, 4, 1)
    queries = torch.stack([torch.ones(4, 1), torch.zeros(4, 1)])[None]
    inputs = layer_inputs(queries, keys)
    want = torch.tensor([(0.25 + 1.2 * 0.175) / 2, (1 / 3 + 1.2 * 0.225) / 2])
    assert torch.allclose(pvc_scores(inputs.queries, inputs.keys, 1.0, 2, 1.2, 0), want)
    assert torch.allclose(pvc_scores(inputs.queries, inputs.keys, 1.0, 2, 1.2, 0, chunk_elems=1), want)  # in chunks
    sink = pvc_scores(inputs.queries, inputs.keys, 1.0, 2, 1.2, 1)
    assert sink[0] == torch.finfo(torch.float32).max and sink[1] == pytest.approx(float(want[1]))


# ---- on a model ----------------------------------------------------------------------------------------------
def official_next(attn, tokens, n_recent, n_context, distance_weight=1.2, sink_len=4):
    """The tokens that go on after a layer, by mutonix/pyramidinfer's LlamaModel.forward: the layer's eager
    attention [1, H, T, T] among its own tokens, head mean, recent rows onto the context weighted by
    linspace(1, w, R + 1), row mean, sinks forced, top-k context + the recent window."""
    a = attn[0][:, tokens][:, :, tokens].mean(dim=0)
    recent2context = a[-n_recent:, :-n_recent] * torch.linspace(1.0, distance_weight, n_recent)[:, None]
    recent2context = recent2context.mean(dim=-2)
    recent2context[:sink_len] = torch.finfo(recent2context.dtype).max
    top = recent2context.topk(n_context).indices.sort().values
    return torch.cat([tokens[top], tokens[-n_recent:]])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_each_shrink_is_the_official_one_and_the_prefill_is_the_masked_reference(family):
    model, _ = build_tiny(family, num_hidden_layers=N_LAYERS)
    t, decay = len(PROMPT), 0.3
    m = method("pyramidinfer", decay_ratio=decay, min_context=8)
    with install(model) as hooks, SeenBy(model) as seen:
        pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=1.0)  # keep 1.0: the pyramid alone, no cut
    tokens = [t_ if t_ is not None else torch.arange(t) for t_ in m.scorer.layerwise.tokens]
    n_recent = int(t * 0.2) + 1
    # the official counts: int(context * s(l)) while above min_context, s(l) = 0.7 * (cos(pi l / 6) + 1) / 2 + 0.3
    context, want_counts = t - n_recent, []
    for layer in range(N_LAYERS):
        want_counts.append(context + n_recent)
        k = int(context * ((1.0 - decay) * (math.cos(math.pi * layer / N_LAYERS) + 1) / 2 + decay))
        context = k if k > 8 and context > 8 else context
    assert [seen.lengths[i] for i in range(N_LAYERS)] == want_counts == pre.extras["pyramidinfer_tokens_by_layer"]
    assert want_counts[2] < want_counts[1] and want_counts[-1] < want_counts[2]  # it really shrinks, repeatedly
    assert all(seen.positions[i] == tokens[i].tolist() for i in range(N_LAYERS))
    assert [layer.keys.shape[-2] for layer in pre.cache.layers] == want_counts
    # each shrink is the official formula on that layer's attention (a masked forward: exact for its tokens)
    _, _, attentions = masked_reference(model, PROMPT, m.scorer.layerwise.tokens, attentions=True)
    for layer in pre.extras["pyramidinfer_layers"]:
        nxt = official_next(attentions[layer], tokens[layer], n_recent, want_counts[layer + 1] - n_recent)
        assert torch.equal(tokens[layer + 1], nxt), layer
    ref_cache, ref_logits, _ = masked_reference(model, PROMPT, m.scorer.layerwise.tokens)
    assert_cache_is_reference(pre.cache, ref_cache, pre.prefill_kept)
    assert torch.allclose(pre.last_logits[0], ref_logits, atol=1e-5)


def test_the_budget_below_the_pyramid_cuts_each_layer_to_its_share():
    model, _ = build_tiny("qwen3", num_hidden_layers=N_LAYERS)
    t, ratio = len(PROMPT), 0.25
    budget = n_keep(t, ratio)
    m = method("pyramidinfer", min_context=8)
    with install(model) as hooks:
        pre = prefill(model, hooks, PROMPT, m, seed=0, keep_ratio=ratio)
    extras = pre.extras
    assert extras["pyramidinfer_scaled"] and extras["pyramidinfer_decay"] == 0.0
    kept = extras["pyramidinfer_kept_by_layer"]
    assert sum(kept) == N_LAYERS * budget  # the total over layers is the budget's
    assert [layer.keys.shape[-2] for layer in pre.cache.layers] == kept
    n_recent = extras["pyramidinfer_recent"]
    for layer, (held, share) in enumerate(zip(pre.prefill_kept, kept)):
        processed = m.scorer.layerwise.layer_tokens(layer)
        assert bool(torch.isin(held, processed).all())
        recent = min(n_recent, share)
        assert held[0, -recent:].tolist() == list(range(t - recent, t))  # the recent window first
    ref_cache, ref_logits, _ = masked_reference(model, PROMPT, m.scorer.layerwise.tokens)
    assert_cache_is_reference(pre.cache, ref_cache, pre.prefill_kept)
    assert torch.allclose(pre.last_logits[0], ref_logits, atol=1e-5)
    _, planned = m.plan(pre.scores, ratio)  # nothing is left to evict after the prefill
    assert planned == [None] * N_LAYERS and [h[0] for h in kept_per_head(prune(pre.cache, planned))] == kept


# ---- rows ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_and_rows_record_the_pyramid(family):
    from harness.pipeline import run_sample

    model, tok = build_tiny(family, num_hidden_layers=4)
    ctx, question = PROMPT[:96], PROMPT[96:]
    with install(model) as hooks:
        out, = run_sample(model, tok, hooks, method("pyramidinfer", min_context=8), ctx, question, [0.9], True, 1,
                          [], 0)
    t, extras = len(PROMPT), out.extras
    assert sum(extras["pyramidinfer_kept_by_layer"]) <= 4 * n_keep(t, 0.9)
    assert out.kept_tokens == sum(extras["pyramidinfer_kept_by_layer"]) / 4
    assert extras["pyramidinfer_tokens_by_layer"][0] == t and extras["pyramidinfer_recent"] == int(t * 0.2) + 1
    # 0.9 of 4 layers is within the schedule's reach: a real pyramid, each cache what reached its layer
    assert extras["pyramidinfer_layers"] and not extras["pyramidinfer_scaled"]
    assert extras["pyramidinfer_tokens_by_layer"][-1] < t
    assert extras["pyramidinfer_kept_by_layer"] == extras["pyramidinfer_tokens_by_layer"]


def test_rows_on_the_reference_model(tmp_path):
    from test_every_config import compose

    from harness.io import read_rows
    from harness.runner import run

    cfg = compose("method=pyramidinfer", "model=reference", "task=ruler/niah_single_1", "context_length=256",
                  "n_samples=1", "keep_ratio=[0.25,0.9]", "max_new_tokens=2", "progress=false")
    run(cfg, tmp_path)
    rows = {r["keep_ratio"]: r for r in read_rows(tmp_path / "predictions.jsonl")[0]}
    for ratio, row in rows.items():
        budget = n_keep(row["context_tokens"], ratio)
        assert sum(row["pyramidinfer_kept_by_layer"]) <= 4 * budget and row["kept_tokens"] <= budget
    # 0.25 is below what 4 layers' cosine schedule reaches (layers 0 and 1 hold everything): cut to the budget
    assert rows[0.25]["pyramidinfer_scaled"] and sum(rows[0.25]["pyramidinfer_kept_by_layer"]) == 4 * n_keep(
        rows[0.25]["context_tokens"], 0.25)
    assert not rows[0.9]["pyramidinfer_scaled"] and rows[0.9]["pyramidinfer_layers"]


def test_bad_values_are_refused_in_one_line(capsys, tmp_path):
    from conftest import refused_in_process

    run_dir = tmp_path / "run"
    for arg, key in [("method.scorer.decay_ratio=1.5", "method.scorer.decay_ratio"),
                     ("method.scorer.recent_ratio=-0.1", "method.scorer.recent_ratio"),
                     ("method.scorer.downsample_interval=0", "method.scorer.downsample_interval"),
                     ("method.scorer.distance_weight=-1", "method.scorer.distance_weight")]:
        line = refused_in_process(capsys, "method=pyramidinfer", arg, "model=tiny-random", "n_samples=1",
                                  f"hydra.run.dir={run_dir}")
        assert key in line and not run_dir.exists(), line
