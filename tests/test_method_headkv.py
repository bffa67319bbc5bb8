"""HeadKV's allocator (methods/headkv.py): budgets against the official ReasonSnapKVCluster's on the published
Llama-3 / Mistral head scores and hand-made grids (tests/fixtures/headkv, tools/official/dump_headkv_budgets.py),
hand-computed budgets, exact totals and floors, the official score-file format, model checks, the method
configs, and the retrieval-reasoning score command."""
import json
from pathlib import Path

import pytest
import torch

import methods
from harness.compress import n_keep
from harness.errors import KvbenchError
from methods.headkv import (HeadKVAllocator, head_shares, headkv_budgets, load_head_scores, needle_hits,
                            parse_head_scores, save_head_scores)
from tests.conftest import refused_in_process

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((ROOT / "tests/fixtures/headkv/budget_cases.json").read_text())
BIG_T = 2 ** 20  # no head reaches its context: the official capacities are never cut


def _case_shares(case):
    scores = case["scores"] if isinstance(case["scores"], dict) else FIXTURE["published"][case["scores"]]["scores"]
    heads = parse_head_scores(json.dumps(scores), "case")
    return head_shares(heads.importance(), case["temp"]).reshape(case["n_layers"], case["n_heads"])


def _official_budgets(case, n_kv):
    b = case["max_capacity_prompts"]
    return headkv_budgets(_case_shares(case), [BIG_T] * case["n_layers"], n_kv, b / BIG_T, case["beta"],
                          case["window"])


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["name"] for c in FIXTURE["cases"]])
def test_budgets_are_the_official_capacities_made_exact(case):
    """Each query head as a head of its own: the official torch.round of every capacity, up to the entries that
    make the total exact (one per head at most, as many as the official total misses)."""
    n_layers, n_heads, b, window = case["n_layers"], case["n_heads"], case["max_capacity_prompts"], case["window"]
    ours = _official_budgets(case, n_heads)
    official = torch.tensor(case["head_capacity"])
    assert int(ours.sum()) == n_layers * n_heads * b
    diff = ours - window - official
    assert int(diff.abs().max()) <= 1
    assert int(diff.abs().sum()) == abs(n_layers * n_heads * (b - window) - int(official.sum()))
    if int(official.sum()) == n_layers * n_heads * (b - window):
        assert torch.equal(ours - window, official)


@pytest.mark.parametrize("case", [c for c in FIXTURE["cases"] if c["n_heads"] == 32],
                         ids=[c["name"] for c in FIXTURE["cases"] if c["n_heads"] == 32])
def test_a_kv_head_gets_its_query_heads_mean_capacity(case):
    """Llama-3-8B and Mistral-7B: 32 query heads over 8 KV heads; a KV head keeps its group's mean official
    capacity (each official one within 1/2 of its ideal, ours within 1 of the group's)."""
    official = torch.tensor(case["head_capacity"]).double().reshape(case["n_layers"], 8, 4).mean(dim=-1)
    ours = _official_budgets(case, 8)
    assert int(ours.sum()) == case["n_layers"] * 8 * case["max_capacity_prompts"]
    assert float((ours - case["window"] - official).abs().max()) < 1.5


def test_hand_computed_pool():
    # shares 3/4, 1/4, 0, 0; T 100, keep 0.2 -> b 20, window 4 -> base 16; beta 2: 16 // 2 = 8 to the pool of
    # 8 x 2 layers x 2 heads = 32, min 8 -> 0.75 x 32 + 8 = 32, 16, 8, 8 (+ window 4): sum 80 = 4 x 20
    shares = head_shares([3.0, 1.0, 0.0, 0.0], 1.0).reshape(2, 2)
    assert headkv_budgets(shares, [100, 100], 2, 0.2, 2.0, 4).tolist() == [[36, 20], [12, 12]]


def test_hand_computed_remainder_and_temperature():
    # means 2, 1, 1: shares .5, .25, .25; b 10 (T 50, keep .2), beta 1.5: 10 // 1.5 = 6.0, pool 6 x 3 = 18, min 4 ->
    # 13, 8.5, 8.5 = 30; floors 29, the one entry left to the first of the tied fractions (the official
    # torch.round gives 8, 8: 29 entries)
    assert headkv_budgets(head_shares([2.0, 1.0, 1.0], 1.0).reshape(1, 3), [50], 3, 0.2, 1.5, 0).tolist() == [[13, 9, 8]]
    # means 1, 3, temp 2: (1/4)^2, (3/4)^2 normalised -> .1, .9; b 20 (T 40, keep .5), window 2 -> base 18, beta 3:
    # pool 6 x 2 = 12, min 12 -> 13.2, 22.8 = 36: floors 35, +1 to .8 -> 13, 23, + window -> 15, 25
    assert head_shares([1.0, 3.0], 2.0).tolist() == pytest.approx([0.1, 0.9])
    assert headkv_budgets(head_shares([1.0, 3.0], 2.0).reshape(1, 2), [40], 2, 0.5, 3.0, 2).tolist() == [[15, 25]]


def test_hand_computed_gqa_and_caps():
    # 4 query heads over 2 KV heads, means 3, 1, 0, 0: KV shares 1, 0; b 10 (T 100, keep .1), beta 2: pool 5 x 2,
    # min 5 -> 15, 5
    assert headkv_budgets(head_shares([3.0, 1.0, 0.0, 0.0], 1.0).reshape(1, 4), [100], 2, 0.1, 2.0, 0).tolist() == [[15, 5]]
    # means 1, 0, 0; b 5 (T 10, keep .5), beta 1: pool 5 x 3 = 15, min 0 -> 15, 0, 0; head 0 holds 10 entries, the
    # others keep one at least and the 3 left go one at a time, ties to the lower head -> 10, 3, 2
    assert headkv_budgets(head_shares([1.0, 0.0, 0.0], 1.0).reshape(1, 3), [10], 3, 0.5, 1.0, 0).tolist() == [[10, 3, 2]]


def test_totals_floors_and_ragged_selection():
    gen = torch.Generator().manual_seed(0)
    means = (torch.rand(24, generator=gen) ** 4).tolist()
    sizes = [300, 257, 300]
    for temp in (0.5, 1.0, 2.0):
        shares = head_shares(means, temp).reshape(3, 8)
        for beta in (1.0, 1.005, 1.5, 10.0):
            for keep in (0.05, 0.25, 0.5, 0.9):
                b = headkv_budgets(shares, sizes, 4, keep, beta, 8)
                assert int(b.sum()) == 4 * sum(n_keep(t, keep) for t in sizes)
                for layer, t in enumerate(sizes):
                    base = n_keep(t, keep) - min(8, n_keep(t, keep))
                    floor = min(8, n_keep(t, keep)) + int(base - base // beta)
                    assert int(b[layer].min()) >= min(floor, t) and int(b[layer].max()) <= t
    m = methods.load("snapkv", allocator="headkv")  # the shipped reference scores: 4 layers x 4 query heads
    scores = [torch.rand(1, 2, 300, generator=gen) for _ in range(4)]
    budgets, kept = m.plan(scores, 0.25)
    assert int(budgets.sum()) == 8 * n_keep(300, 0.25) and len(set(budgets.flatten().tolist())) > 2
    for layer, idx in enumerate(kept):
        heads = idx if isinstance(idx, list) else list(idx.unbind(0))
        assert [len(h) for h in heads] == budgets[layer].tolist()
        assert all(set(range(300 - 32, 300)) <= set(h.tolist()) for h in heads)  # SnapKV's window kept


def _official_file(path, grid, newline=False):
    text = json.dumps({f"{l}-{h}": v for (l, h), v in grid.items()})
    path.write_text(text + ("\n" if newline else ""))  # the official json.dump: one line, no newline
    return path


def test_reads_the_official_format_and_writes_it_back(tmp_path):
    grid = {(0, 0): [0.5, 0.25], (0, 1): [0, 0.125], (1, 0): [1.0], (1, 1): [0.0, 0.0, 0.75]}
    heads = load_head_scores(_official_file(tmp_path / "official.json", grid))
    assert (heads.n_layers, heads.n_heads, heads.meta) == (2, 2, {})
    assert heads.importance() == pytest.approx([0.375, 0.0625, 1.0, 0.25])
    out = save_head_scores(tmp_path / "ours.json", heads.lists, {"model": "m"})
    first = out.read_text().splitlines()[0]
    assert json.loads(first) == json.loads((tmp_path / "official.json").read_text())  # what the official reads
    again = load_head_scores(out)
    assert again.lists == heads.lists and again.meta["model"] == "m" and again.meta["format"].startswith("kvbench")
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps({f"{l}-{h}": v for (l, h), v in grid.items()}, indent=2))
    assert load_head_scores(pretty).lists == heads.lists


@pytest.mark.parametrize("text, match", [
    ("", "is empty"),
    ('{"0-0": [1.0], "0-1": [1.0], "1-1": [1.0]}', "1 of 2 x 2 heads have no scores .first: '1-0'"),
    ('{"0-0": [1.0], "a-1": [1.0]}', "key 'a-1' is not"),
    ('{"0-0": []}', "not a non-empty list"),
    ('{"0-0": [-1.0]}', "finite scores >= 0"),
    ('{"0-0": [true]}', "finite scores >= 0"),
    ('{"0-0": [0.0], "0-1": [0]}', "every head scores 0"),
    ('[1, 2]', "not a non-empty JSON object"),
    ('{"0-0": [1.0]}\n{"other": 1}', "line 2 is not kvbench's"),
    ('{"0-0": [1.0]', "is not JSON"),
])
def test_bad_score_files_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(KvbenchError, match=match) as err:
        load_head_scores(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_model_checks(tmp_path, tiny_llama):
    from harness.models import build_tiny, model_identity

    alloc = HeadKVAllocator()  # the shipped reference scores
    with pytest.raises(KvbenchError, match="4 layers x 4 query heads; this model has 2 x 4"):
        alloc.bind_model(tiny_llama[0])
    with pytest.raises(KvbenchError, match="4 layers x 4 query heads; this run scores 2 layers"):
        alloc.budgets([torch.zeros(1, 50)] * 2, 0.5)
    model = tiny_llama[0]
    lists = [[[1.0], [2.0], [0.0], [1.0]], [[3.0], [4.0], [0.5], [0.5]]]  # the tiny model: 2 layers x 4 query heads
    official = HeadKVAllocator(scores=str(save_head_scores(tmp_path / "a.json", lists, {})))
    official.heads.meta = {}  # an official file: the grid is all it says
    official.bind_model(model)
    ours = HeadKVAllocator(scores=str(save_head_scores(tmp_path / "b.json", lists, model_identity(model))))
    ours.bind_model(model)
    tuned, _ = build_tiny("llama")
    with torch.no_grad():
        tuned.get_input_embeddings().weight.mul_(1.1)
    with pytest.raises(KvbenchError, match="another model: weights fingerprint"):
        ours.bind_model(tuned)
    assert ours.input_files() == {"method.allocator.scores": (tmp_path / "b.json").resolve()}


def test_bad_values_refused(capsys, tmp_path):
    base = ["method=snapkv", "method.allocator=headkv", "model=reference", "task=ruler/niah_single_1"]
    assert "method.allocator.beta" in refused_in_process(capsys, *base, "method.allocator.beta=0.5")
    assert "method.allocator.temp" in refused_in_process(capsys, *base, "method.allocator.temp=-1")
    line = refused_in_process(capsys, *base, f"method.allocator.scores={tmp_path / 'none.json'}")
    assert "does not exist" in line and "python -m methods.headkv" in line


def test_configs():
    m = methods.load("headkv")
    assert m.name == "headkv" and m.scorer.registered_name == "snapkv"
    assert (m.scorer.window, m.scorer.kernel, m.scorer.pool, m.selector.n_recent) == (8, 7, "max", 8)  # official runs
    assert (m.allocator.beta, m.allocator.temp, m.allocator.window) == (1.5, 1.0, 8)
    m = methods.load("snapkv", allocator="headkv")
    assert m.name == "snapkv+headkv" and m.allocator.window == 32 and m.scorer.window == 32
    assert methods.load("knorm", allocator="headkv").allocator.window == 0  # no recent window: all in the pool


def test_needle_hits_by_hand():
    # head 0: top-2 of [.5, .1, .3, .1] = positions 0, 2; the needle is 2, 3 -> .3 / 2; head 1: top-2 = 3, 2 -> (.4 + .3) / 2
    rows = {0: torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.1, 0.2, 0.3, 0.4]])}
    assert needle_hits(rows, torch.tensor([2, 3])).tolist() == [pytest.approx([0.15, 0.35])]


def test_score_command_on_the_reference_model(tmp_path, capsys):
    from methods.headkv import main

    out = tmp_path / "scores.json"
    main(["model=reference", "task=ruler/niah_single_1", "context_length=512", "n_samples=2", f"out={out}"])
    assert "4 layers x 4 query heads" in capsys.readouterr().out
    heads = load_head_scores(out)
    assert (heads.n_layers, heads.n_heads) == (4, 4) and heads.meta["task"] == "ruler/niah_single_1"
    assert heads.meta["n_right"] == len(heads.lists[0][0]) >= 1
    top = max(range(16), key=lambda i: heads.importance()[i])
    assert top // 4 == 1  # the reference model retrieves in layer 1 (its induction heads)
    with pytest.raises(SystemExit):
        main(["model=reference", "task=random", f"out={out}"])
    assert "no needle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["model=tiny-random", "task=ruler/niah_single_1", "context_length=512", "n_samples=1", f"out={out}"])
    assert "answered right" in capsys.readouterr().err
