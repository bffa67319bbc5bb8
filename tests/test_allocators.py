"""Budget allocators (pyramid, adakv, lukv + the profile's hull/greedy math) and the expected_attention scorer,
on hand-made tensors with hand-computed expectations; the kvbench-profile command on tiny models."""
import math
from pathlib import Path

import pytest
import torch

import methods
from harness.compress import LayerInputs, n_keep, round_to_total
from harness.errors import KvbenchError
from harness.profile import concave_envelope, greedy_allocate, hull_segments, main
from harness.profiles import Profile, load_profile, save_profile

ROOT = Path(__file__).resolve().parent.parent


def method(name, **overrides):
    return methods.load(name, **overrides)


def allocator(name, **params):
    methods.load_all()
    from harness.compress import ALLOCATORS

    return ALLOCATORS[name](**params)


# ---------------------------------------------------------------------------------------------------- pyramid


def test_pyramid_kvpress_fixture_case():
    # T=200, keep 0.5, window 64, beta 20: capacity 164, min 5, max 195 -> capped to T - window = 136,
    # min = 2*100 - 136 = 64; steps (136 - 64) / 2 = 36 -> 136, 100, 64 (sum 300 = 3 x 100)
    b = allocator("pyramid", beta=20, window=64).budgets([torch.zeros(2, 200)] * 3, 0.5)
    assert b.tolist() == [[136, 136], [100, 100], [64, 64]]


def test_pyramid_linear_decrease_without_window():
    # T=100, keep 0.2, 5 layers, window 0: min 20/20 = 1, max 40 - 1 = 39, steps 38/4 = 9.5:
    # 39, 29.5 -> 30 (half to even), 20, 10.5 -> 10, 1; sum 100 = 5 x 20
    b = allocator("pyramid", beta=20, window=0).budgets([torch.zeros(3, 100)] * 5, 0.2)
    assert b[:, 0].tolist() == [39, 30, 20, 10, 1]
    assert (b == b[:, :1]).all() and int(b[:, 0].sum()) == 5 * n_keep(100, 0.2)


def test_pyramid_degenerate_falls_back_to_uniform_round():
    # T=200, keep 0.25, window 64: min 2.5 < window -> SnapKV's round(200 * 0.25) = 50 everywhere
    b = allocator("pyramid", beta=20, window=64).budgets([torch.zeros(1, 200)] * 3, 0.25)
    assert b.flatten().tolist() == [50, 50, 50]


def test_pyramidkv_config():
    m = method("pyramidkv")
    assert m.name == "pyramidkv" and m.allocator.registered_name == "pyramid" and m.allocator.window == 32
    assert m.scorer.registered_name == "snapkv"


# ---------------------------------------------------------------------------------------------------- adakv


def test_adakv_floors_then_global_topk_by_hand():
    # H=2, T=8, keep 0.25: n_kept 2 -> layer total 4; floor int(2 * 0.2) = 0 -> 1 per head.
    # head 1's best (10) is the global best but is its floor; the 2 global picks beyond the floors are
    # head 0's 8 and 7 -> budgets [3, 1]. (Taking the global top-2 without excluding floors would give 10, 9:
    # both already floors, total 2.)
    scores = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3, 2], [10.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -1]])
    assert allocator("adakv", alpha=0.2).budgets([scores], 0.25).tolist() == [[3, 1]]
    # alpha 0.5 -> floor int(2 * 0.5) = 1 too; alpha 1 -> floor 2 per head -> [2, 2]
    assert allocator("adakv", alpha=1.0).budgets([scores], 0.25).tolist() == [[2, 2]]


def test_adakv_window_is_forced_like_kvpress():
    # SnapKV leaves its window at 0 for the selector; AdaKV must count it as forced (kvpress pads max + 1).
    scores = torch.tensor([[5.0, 4, 3, 2, 0, 0], [1.0, 0.9, 0.8, 0.7, 0, 0]])
    # keep 2/3: n_kept 4, total 8, floor int(0.8) -> 1 per head. With window 2: the 4 window entries are forced
    # (each head's floor is one of them, as in kvpress), then the 4 best others: 5, 4, 3, 2 (head 0) -> [6, 2]
    assert allocator("adakv", alpha=0.2, window=2).budgets([scores], 2 / 3).tolist() == [[6, 2]]
    # without the window: floors 5 and 1, then 4, 3, 2, 0.9, 0.8, 0.7 -> [4, 4]
    assert allocator("adakv", alpha=0.2).budgets([scores], 2 / 3).tolist() == [[4, 4]]


def test_adakv_keeps_exactly_global_top_beyond_floors():
    gen = torch.Generator().manual_seed(0)
    n_heads, n_tokens = 4, 40
    scores = torch.rand(n_heads, n_tokens, generator=gen) ** torch.tensor([[1.0], [3.0], [0.3], [1.0]])
    m = method("snapkv", allocator="adakv", n_recent=0, alpha=0.2)  # hand-made scores, nothing forced
    m.allocator.window = 0  # AdaKV forces no recent token (method.window=0 would also reach SnapKV, where 0 is invalid)
    budgets, kept = m.plan([scores[None]], 0.25)
    n_kept = n_keep(n_tokens, 0.25)  # 10 -> layer total 40, floor 2 per head
    assert int(budgets.sum()) == n_heads * n_kept and len(set(budgets[0].tolist())) > 1
    floors = scores.topk(2, dim=-1).indices
    rest = scores.clone().scatter_(-1, floors, -math.inf)
    extra = rest.flatten().topk(n_heads * n_kept - 2 * n_heads).indices
    want = [set(floors[h].tolist()) | {int(i) % n_tokens for i in extra if int(i) // n_tokens == h}
            for h in range(n_heads)]
    assert [set(k.tolist()) for k in kept[0]] == want


def test_adakv_sums_exactly_over_layers_and_ratios():
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(3, 37, generator=gen) for _ in range(4)]
    for ratio in (0.1, 0.25, 0.33, 0.5, 0.9):
        b = allocator("adakv", alpha=0.2, window=4).budgets(scores, ratio)
        assert b.sum(dim=1).tolist() == [3 * n_keep(37, ratio)] * 4
        assert int(b.min()) >= max(1, int(n_keep(37, ratio) * 0.2))


def test_adakv_configs():
    assert method("snapkv_adakv").name == "snapkv+adakv"
    assert method("snapkv", allocator="adakv").name == "snapkv+adakv"
    m = method("expected_attention_adakv")
    assert m.name == "expected_attention+adakv" and m.allocator.alpha == 0.2


# ---------------------------------------------------------------------------------------------------- hull / greedy


def test_concave_envelope_and_segments():
    x = [0.0, 1, 2, 3, 4]
    assert concave_envelope(x, [0.0, 0.1, 0.2, 1.0, 1.0]) == [0, 3, 4]
    segs = hull_segments(x, [0.0, 0.1, 0.2, 1.0, 1.0])
    assert segs == [(3.0, pytest.approx(1 / 3)), (1.0, 0.0)]
    assert concave_envelope(x, [0.0, 0.3, 0.5, 0.6, 0.7]) == [0, 1, 2, 4]  # collinear 2-3-4: middle dropped


def test_greedy_over_hull_beats_raw_marginals():
    # A is convex at first (0.1, 0.1, then 0.8): its hull is one segment of slope 1/3 over 3 units.
    # B is concave: 0.3, 0.2, 0.1, 0.1. Greedy on raw marginals would start with B (0.3 > 0.1) and give
    # B all 3 units (utility 0.6); on the hull A's 1/3 comes first: A = 3 (utility 1.0).
    x = [0.0, 1, 2, 3, 4]
    curves = torch.tensor([[0.0, 0.1, 0.2, 1.0, 1.0], [0.0, 0.3, 0.5, 0.6, 0.7]])
    assert greedy_allocate(x, curves, 3).tolist() == [3.0, 0.0]
    assert greedy_allocate(x, curves, 5).tolist() == [3.0, 2.0]  # then B's 0.3 and 0.2
    assert greedy_allocate(x, curves, 4.5).tolist() == [3.0, 1.5]  # fractional last segment
    assert greedy_allocate(x, curves, 8).tolist() == [4.0, 4.0]


def test_round_to_total():
    # floors [1, 2, 0 -> lo 1, 5] = 9; +1 to the largest fractional part (5.8)
    out = round_to_total(torch.tensor([1.5, 2.5, 0.2, 5.8]), 10, 1, torch.tensor([2, 3, 3, 6]))
    assert out.tolist() == [1, 2, 1, 6]
    out = round_to_total(torch.tensor([3.9, 3.9, 3.9]), 9, 1, 10)  # floors 9: nothing to do
    assert out.tolist() == [3, 3, 3]
    out = round_to_total(torch.tensor([0.1, 9.0]), 6, 1, torch.tensor([5, 5]))  # hi caps 9 -> 5, lo lifts 0.1
    assert out.tolist() == [1, 5]


# ---------------------------------------------------------------------------------------------------- lukv


def _profile(tmp_path, meta=None, name="p.safetensors"):
    budgets = torch.tensor([[[0.1, 0.4], [0.2, 0.3]], [[0.2, 0.8], [0.4, 0.6]]])  # ratios 0.25 and 0.5 (sums 1, 2)
    meta = {"model": "tiny-random", "n_layers": 2, "n_kv_heads": 2, "scope": "global", **(meta or {})}
    return save_profile(tmp_path / name, Profile(budgets, torch.tensor([0.25, 0.5]), meta))


def test_lukv_profile_round_trip_and_budgets(tmp_path):
    path = _profile(tmp_path)
    prof = load_profile(path)
    assert prof.budgets.shape == (2, 2, 2) and prof.ratios.tolist() == [0.25, 0.5]
    assert prof.meta["model"] == "tiny-random" and prof.meta["n_layers"] == 2 and prof.meta["scope"] == "global"
    alloc = allocator("lukv", profile=str(path))
    scores = [torch.zeros(2, 100)] * 2
    # at a profiled ratio: shares x 100, total 4 x 25
    assert alloc.budgets(scores, 0.25).tolist() == [[10, 40], [20, 30]]
    # 0.375: halfway, [[15, 60], [30, 45]] = 150, rescaled to 4 x n_keep(100, 0.375) = 148:
    # [14.8, 59.2, 29.6, 44.4] -> floors 146, +1 to the fractions .8 and .6 -> [[15, 59], [30, 44]]
    assert alloc.budgets(scores, 0.375).tolist() == [[15, 59], [30, 44]]
    for ratio in (0.05, 0.3, 0.5, 0.8, 1.0):
        assert int(alloc.budgets(scores, ratio).sum()) == 4 * n_keep(100, ratio)


def test_lukv_refuses_other_models_and_missing_profile(tmp_path, tiny_llama):
    with pytest.raises(KvbenchError, match="method.allocator.profile="):
        method("lukv", profile=None)
    with pytest.raises(KvbenchError, match="does not exist"):
        allocator("lukv", profile=str(tmp_path / "nope.safetensors"))
    (tmp_path / "bad.safetensors").write_text("not a profile")
    with pytest.raises(KvbenchError, match="not a kvbench-profile"):
        allocator("lukv", profile=str(tmp_path / "bad.safetensors"))
    alloc = allocator("lukv", profile=str(_profile(tmp_path)))
    with pytest.raises(KvbenchError, match="2 layers x 2 KV heads") as err:
        alloc.budgets([torch.zeros(2, 50)] * 3, 0.25)
    assert "\n" not in str(err.value)
    alloc.bind_model(tiny_llama[0])  # no config hash recorded: shape and name only
    from harness.models import build_tiny

    other, _ = build_tiny("llama", num_hidden_layers=3)
    with pytest.raises(KvbenchError, match="3 x 2"):
        alloc.bind_model(other)
    from harness.models import model_identity

    wide = model_identity(build_tiny("llama", hidden_size=128)[0])
    alloc = allocator("lukv", profile=str(_profile(tmp_path, {"config_hash": wide["config_hash"]}, "w.safetensors")))
    with pytest.raises(KvbenchError, match="another model"):
        alloc.bind_model(tiny_llama[0])


def test_profile_records_the_model_identity_and_refuses_other_weights(tmp_path):
    from harness.models import build_tiny, model_identity
    from methods.lukv import LUKVAllocator

    model, _ = build_tiny("llama")
    facts = model_identity(model)
    alloc = LUKVAllocator(profile=str(_profile(tmp_path, facts)))
    assert alloc.profile.meta["fingerprint"] == facts["fingerprint"]  # through the file and back
    alloc.bind_model(model)
    tuned, _ = build_tiny("llama")
    with torch.no_grad():
        tuned.get_input_embeddings().weight.mul_(1.1)
    with pytest.raises(KvbenchError, match="another model: weights fingerprint") as err:
        alloc.bind_model(tuned)
    assert "\n" not in str(err.value)
    old = LUKVAllocator(profile=str(_profile(tmp_path, {"config_hash": facts["config_hash"]}, "old.safetensors")))
    old.bind_model(tuned)  # a profile of an earlier version records no fingerprint: architecture and name only


def test_profile_command_on_tiny_random(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    main(["model=tiny-random", "task=ruler/niah_single_1", "context_length=512", "n_samples=1", "grid=20",
          "ratios=0.25,0.5", f"out={out}"])
    assert "2 layers x 2 KV heads" in capsys.readouterr().out
    prof = load_profile(out)
    assert prof.budgets.shape == (2, 2, 2) and prof.curves.shape == (2, 2, 21)
    assert prof.meta["task"] == "ruler/niah_single_1"  # calibrated on the task, not on random tokens
    assert prof.meta["method"]["scorer"]["name"] == "expected_attention" and prof.meta["n_layers"] == 2
    # global scope: shares sum to ratio x L x H; each normalised layer curve ends at 1 (sum over heads)
    assert prof.budgets.sum(dim=(1, 2)).tolist() == pytest.approx([1.0, 2.0], abs=1e-5)
    assert prof.curves[..., -1].sum(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (prof.curves.diff(dim=-1) >= -1e-6).all()  # retained utility never decreases with the budget
    # the profile drives a run of the same model: exact totals, ragged heads allowed
    from harness.attention import install
    from harness.models import build_tiny
    from harness.pipeline import prefill

    model, _ = build_tiny("llama")
    m = method("lukv", profile=str(out))
    m.allocator.bind_model(model)
    with install(model) as hooks:
        pre = prefill(model, hooks, list(range(3, 203)), m, seed=0)
    budgets, kept = m.plan(pre.scores, 0.3)
    assert int(budgets.sum()) == 4 * n_keep(200, 0.3)


def test_profile_command_random_calibration_and_errors(tmp_path, capsys):
    out = tmp_path / "rnd.safetensors"
    main(["model=tiny-random", "task=random", "context_length=128", "n_samples=2", "grid=10", "ratios=0.5",
          "scope=layer", f"out={out}"])
    prof = load_profile(out)
    assert prof.meta["task"] == "random" and prof.meta["scope"] == "layer"
    assert prof.budgets[0].sum(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)  # per layer: 0.5 x 2 heads
    with pytest.raises(SystemExit):
        main(["model=tiny-random", "task=random"])  # no out=
    assert "out=" in capsys.readouterr().err


@pytest.mark.skipif(not (ROOT / "harness/reference/checkpoint/config.json").exists(),
                    reason="reference checkpoint not trained yet")
def test_profile_command_on_reference_model(tmp_path):
    out = tmp_path / "ref.safetensors"
    model = ["model=reference"] if (ROOT / "conf/model/reference.yaml").exists() else ["model=tiny-random",
                                                                                        "model.name=reference"]
    main([*model, "task=random", "context_length=256", "n_samples=1", "grid=10", "ratios=0.25", f"out={out}"])
    prof = load_profile(out)
    assert prof.budgets.sum().item() == pytest.approx(0.25 * prof.n_layers * prof.n_kv_heads, abs=1e-4)


# ---------------------------------------------------------------------------------------------------- expected attention


class _NoRotary(torch.nn.Module):
    """A rotary embedding that does not rotate (cos 1, sin 0): pre- and post-RoPE queries coincide."""

    def forward(self, x, position_ids):
        shape = (1, position_ids.shape[-1], x.shape[-1])
        return torch.ones(shape), torch.zeros(shape)


def _ea_inputs(queries, keys, values):
    class _Module(torch.nn.Module):
        scaling = keys.shape[-1] ** -0.5

    return LayerInputs(layer_idx=0, n_layers=1, queries=queries, keys=keys, values=values, module=_Module(),
                       generator=torch.Generator().manual_seed(0), rotary=_NoRotary())


def test_expected_attention_known_mean_zero_covariance():
    # every query (after the sink) is q = [sqrt 2, 0]: mean q, covariance 0, so logits k.q / sqrt 2 = k_x
    # keys after the sink: k_x = ln 1, ln 2, ln 3, ln 2 -> softmax 1/8, 2/8, 3/8, 2/8; value norms 1, 2, 1, 5;
    # epsilon 1/8: (p + e) ||v|| = 0.25, 0.75, 0.5, 1.875; the sink gets max + 1 = 2.875
    q = torch.tensor([math.sqrt(2), 0.0]).expand(1, 1, 5, 2).clone()
    q[0, 0, 0] = torch.tensor([50.0, -7.0])  # the sink's query is excluded from the statistics
    keys = torch.tensor([[9.0, 9.0], [0.0, 1.0], [math.log(2), 0.0], [math.log(3), 5.0], [math.log(2), -3.0]])[None, None]
    values = torch.tensor([[7.0, 7.0], [1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [3.0, 4.0]])[None, None]
    from methods.expected_attention import ExpectedAttentionScorer

    for cov in (True, False):
        s = ExpectedAttentionScorer(n_sink=1, epsilon=0.125, use_covariance=cov).score(_ea_inputs(q, keys, values))
        assert s[0, 0].tolist() == pytest.approx([2.875, 0.25, 0.75, 0.5, 1.875], rel=1e-5)


def test_expected_attention_covariance_term():
    # queries [2, 0] and [-2, 0]: mean 0, covariance diag(4, 0); logit = k^T cov k / (2 d) = k_x^2 (d = 2)
    # k_x = 0, sqrt(ln 3) -> softmax 1/4, 3/4 (no value norm, no sink); GQA: 2 query heads averaged
    q = torch.tensor([[2.0, 0.0], [-2.0, 0.0]]).expand(1, 2, 2, 2)
    keys = torch.tensor([[0.0, 1.0], [math.sqrt(math.log(3)), 0.0]])[None, None]
    from methods.expected_attention import ExpectedAttentionScorer

    s = ExpectedAttentionScorer(n_sink=0, use_vnorm=False).score(_ea_inputs(q, keys, keys.clone()))
    assert s[0, 0].tolist() == pytest.approx([0.25, 0.75], rel=1e-5)


def test_expected_attention_unrotates_real_rope(tiny_llama):
    from methods.expected_attention import average_rotation, rotate_half, unrotate

    model = tiny_llama[0]
    rotary = model.model.rotary_emb
    q = torch.randn(1, 4, 7, 16)
    cos, sin = rotary(q, torch.arange(7)[None])
    rotated = q * cos[:, None] + rotate_half(q) * sin[:, None]
    assert torch.allclose(unrotate(rotated, cos[:, None], sin[:, None]), q, atol=1e-5)
    # the averaged rotation applied to a vector = the average of the rotated vectors
    cos_f, sin_f = rotary(q, torch.arange(7, 30)[None])
    v = torch.randn(16)
    want = (v * cos_f[0] + rotate_half(v) * sin_f[0]).mean(dim=0)
    assert torch.allclose(average_rotation(cos_f[0], sin_f[0]) @ v, want, atol=1e-5)
