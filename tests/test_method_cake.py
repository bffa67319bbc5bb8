"""CAKE (methods/cake.py): layer budgets, preferences, token scores and kept entries against the official
antgroup/cakekv code (tests/fixtures/cake, tools/official/dump_cake_budgets.py), hand-computed budgets, exact
totals, the allocator's own measurement under any scorer (Allocator.observe), configs and bad values."""
import json
from pathlib import Path

import pytest
import torch

import methods
from harness.compress import Method, Selector, n_keep
from harness.errors import KvbenchError
from methods.cake import CakeAllocator, CakeScorer, cake_budgets
from tests.conftest import layer_inputs, refused_in_process

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((ROOT / "tests/fixtures/cake/cases.json").read_text())


def _prefix_budgets(case):
    T, cache_size, window, prefs = case["T"], case["cache_size"], case["window"], case["preferences"]
    return (cake_budgets(prefs, [T] * len(prefs), 1, cache_size / T, window)[:, 0] - window).tolist()


@pytest.mark.parametrize("case", FIXTURE["budget_cases"], ids=[c["name"] for c in FIXTURE["budget_cases"]])
def test_layer_budgets_are_the_officials_made_exact(case):
    """Without the cascade: the official budgets wherever they sum to the total (the official ``adjust_budgets``
    passes), else more (its cut at the cap loses entries: recap_loss_3). With it: the official ends each layer at
    the smallest budget of any step, one entry below ours in a layer where an earlier step's remainder fell
    elsewhere (tiny_8, cascade_short_4)."""
    total = (case["cache_size"] - case["window"]) * len(case["preferences"])
    ours = _prefix_budgets(case)
    assert sum(ours) == total
    for official in (case["kept_no_cascade"], case["kept_cascade"]):
        if sum(official) == total:
            assert ours == official
        else:
            assert all(o >= k for o, k in zip(ours, official)) and sum(official) < total
    assert case["kept_no_cascade"] == [min(b, case["T"] - case["window"]) for b in case["adjust_budgets"]]


def test_the_fixture_holds_the_official_shortfalls():
    short = {c["name"]: (c["kept_no_cascade"], c["kept_cascade"]) for c in FIXTURE["budget_cases"]
             if sum(c["kept_cascade"]) < (c["cache_size"] - c["window"]) * len(c["preferences"])}
    assert set(short) == {"recap_loss_3", "tiny_8", "cascade_short_4"}
    assert short["cascade_short_4"] == ([39, 17, 32, 0], [39, 16, 32, 0])
    case = next(c for c in FIXTURE["budget_cases"] if c["name"] == "recap_loss_3")
    assert _prefix_budgets(case) == [92, 92, 32] and case["kept_no_cascade"] == [92, 92, 23]


@pytest.mark.parametrize("case", FIXTURE["attention_cases"], ids=[c["name"] for c in FIXTURE["attention_cases"]])
def test_preferences_scores_and_kept_entries_are_the_officials(case):
    n_layers, T, w, dim = case["n_layers"], case["T"], case["window"], case["head_dim"]
    scorer = CakeScorer(window=w, gamma=case["gamma"])
    allocator = CakeAllocator(window=w, tau1=case["tau1"], tau2=case["tau2"])
    method = Method("cake", scorer, allocator, Selector(n_recent=w))
    scores = []
    for layer, entry in enumerate(case["layers"]):
        queries = torch.zeros(1, case["n_heads"], T, dim)
        queries[0, :, -w:] = torch.tensor(entry["window_queries"])  # only the window's queries are read
        inputs = layer_inputs(queries, torch.tensor(entry["keys"])[None], layer_idx=layer)
        scores.append(scorer.score(inputs))
        allocator.observe(inputs)
        assert allocator.preferences[layer] == pytest.approx(entry["preference"], rel=1e-5)
        official = torch.tensor(entry["token_scores"])
        assert torch.allclose(scores[-1][0, :, : T - w], official, rtol=1e-5, atol=1e-7)
        assert (scores[-1][0, :, T - w:] == 0).all()  # the window: the selector's
    budgets, kept = method.plan(scores, case["cache_size"] / T)
    assert int(budgets[:, 0].sum()) == n_layers * case["cache_size"]
    for layer, entry in enumerate(case["layers"]):
        heads = kept[layer] if isinstance(kept[layer], list) else list(kept[layer].unbind(0))
        assert [sorted(i for i in h.tolist() if i < T - w) for h in heads] == entry["kept"]
        assert all(set(range(T - w, T)) <= set(h.tolist()) for h in heads)


def test_hand_computed_budgets():
    # prefs 1, 3; T 100, keep .2 -> 20 per layer, window 4: 2 x 16 = 32 shared 8 / 24 -> 12, 28
    assert cake_budgets([1.0, 3.0], [100, 100], 2, 0.2, 4).tolist() == [[12, 12], [28, 28]]
    # prefs 1, 2; 5 per layer, no window: 10 -> 3.33, 6.67 cut to 3, 6; the entry left goes to the lowest layer
    # with room (the official remainder rule), not to the largest fraction -> 4, 6
    assert cake_budgets([1.0, 2.0], [100, 100], 1, 0.05, 0)[:, 0].tolist() == [4, 6]
    # T 8, keep .5: 4 per layer, window 1 -> 3 layers share 9, at most 7 each; prefs 1, 0, 0 -> 9 cut to 7, the 2
    # above spread over the other two -> 7, 1, 1 (+ window)
    assert cake_budgets([1.0, 0.0, 0.0], [8, 8, 8], 1, 0.5, 1)[:, 0].tolist() == [8, 2, 2]
    # no preference anywhere: the total shared evenly; a budget below the window shrinks the window
    assert cake_budgets([0.0, 0.0], [100, 100], 1, 0.3, 8)[:, 0].tolist() == [30, 30]
    assert cake_budgets([1.0, 1.0], [100, 100], 1, 0.03, 8)[:, 0].tolist() == [3, 3]


def test_totals_over_ratios_and_lengths():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        prefs = (torch.rand(6, generator=gen) ** 6).tolist()
        sizes = [int(x) for x in torch.randint(40, 400, (6,), generator=gen)]
        for keep in (0.02, 0.1, 0.25, 0.6, 0.95):
            b = cake_budgets(prefs, sizes, 2, keep, 16)
            assert int(b.sum()) == 2 * sum(n_keep(t, keep) for t in sizes)
            w = min(16, min(n_keep(t, keep) for t in sizes))
            assert all(w <= int(b[l, 0]) <= sizes[l] for l in range(6)) and (b == b[:, :1]).all()


def test_the_allocator_measures_under_any_scorer(tiny_llama):
    from harness.attention import install
    from harness.pipeline import prefill

    model = tiny_llama[0]
    ids = list(range(3, 203))
    for scorer in ("snapkv", "tova", "cake"):
        m = methods.load(scorer, allocator="cake")
        with install(model) as hooks:
            pre = prefill(model, hooks, ids, m, seed=0)
        assert sorted(m.allocator.preferences) == [0, 1] and all(p > 0 for p in m.allocator.preferences.values())
        budgets, _ = m.plan(pre.scores, 0.3)
        assert int(budgets.sum()) == 2 * budgets.shape[1] * n_keep(200, 0.3)
    with pytest.raises(KvbenchError, match="measured the preference of 0 layers but 2 were scored"):
        CakeAllocator().budgets([torch.zeros(2, 50)] * 2, 0.5)


def test_configs_and_bad_values(capsys):
    m = methods.load("cake")
    assert m.name == "cake" and m.scorer.registered_name == "cake" and m.selector.n_recent == 32
    assert (m.scorer.window, m.scorer.kernel, m.scorer.gamma) == (32, 5, 200.0)
    assert (m.allocator.window, m.allocator.tau1, m.allocator.tau2) == (32, 1.0, 1.0)
    assert methods.load("snapkv", allocator="cake").name == "snapkv+cake"
    base = ["method=cake", "model=reference", "task=ruler/niah_single_1"]
    assert "method.allocator.tau1" in refused_in_process(capsys, *base, "method.allocator.tau1=0")
    assert "method.allocator.window" in refused_in_process(capsys, *base, "method.allocator.window=0")
    assert "method.scorer.gamma" in refused_in_process(capsys, *base, "method.scorer.gamma=-1")


def test_the_library_compress_lets_the_allocator_observe(tiny_llama):
    import kvbench
    from transformers import DynamicCache

    from harness.compat import with_cache

    model = tiny_llama[0]
    method = kvbench.method("cake", keep_ratio=0.25)
    cache = DynamicCache()
    with kvbench.compress(model, method), torch.no_grad():
        model(torch.tensor([list(range(3, 203))]), **with_cache(cache), use_cache=True)
    assert sorted(method.allocator.preferences) == [0, 1]
    sizes = [layer.keys.shape[2] for layer in cache.layers]
    assert sum(sizes) == 2 * n_keep(200, 0.25)
