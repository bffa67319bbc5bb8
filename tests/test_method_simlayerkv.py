"""SimLayerKV: laziness, budgets and kept sets by hand (kvpress 0.5.5's SimLayerKVPress on the tiny models:
tests/test_conformance_extra.py, group simlayerkv)."""
import pytest
import torch
from conftest import layer_inputs

import methods
from harness.errors import KvbenchError
from methods.simlayerkv import laziness, simlayer_budgets


def test_laziness_by_hand():
    # zero queries: the last query attends uniformly to its 6 keys; its own column dropped leaves 1/6 each for
    # positions 0..4; the first 1 and the last 2 of those: 3/6
    keys = torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(0))
    inputs = layer_inputs(torch.zeros(1, 4, 6, 4), keys)
    assert laziness(inputs, 1, 1, 2) == pytest.approx(0.5)
    # a key that takes all the last query's attention: lazy if it is the first token, not if it is in the middle
    q = torch.zeros(1, 4, 6, 4)
    q[..., -1, 0] = 50.0
    for pos, want in ((0, 1.0), (2, 0.0)):
        k = torch.zeros(1, 2, 6, 4)
        k[:, :, pos, 0] = 1.0
        assert laziness(layer_inputs(q, k), 1, 1, 2) == pytest.approx(want, abs=1e-6)


def test_threshold_budgets_keep_the_ratio_out():
    # lazy: laziness > 0.5 and T > n_initial + recent + n_last = 4 + 8 + 1; window 4 + 8 - 1 = 11
    got = simlayer_budgets([0.9, 0.4, 0.6], [100, 100, 100], 2, 0.25, 11, 0.5, 13)
    assert got.tolist() == [[11, 11], [100, 100], [11, 11]]
    assert simlayer_budgets([0.9, 0.4], [12, 12], 2, 0.25, 11, 0.5, 13).tolist() == [[12, 12], [12, 12]]  # too short
    assert simlayer_budgets([0.9, 0.4], [100, 100], 2, 0.25, 11, 1.0, 13).tolist() == [[100, 100], [100, 100]]


def test_budget_rule_turns_the_laziest_layers_first_until_the_total_fits():
    # T = 100, window 11, keep 0.5: 150 per head in all (of 300); laziest first: layer 0 (-89 -> 211), then
    # layer 2 gives the last 61 (keeps 39); layer 1, the least lazy, keeps everything
    got = simlayer_budgets([0.9, 0.4, 0.6], [100, 100, 100], 2, 0.5, 11, None, 13)
    assert got.tolist() == [[11, 11], [100, 100], [39, 39]]
    # keep 1/3: 99 per head: layers 0 and 2 lazy, layer 1 gives 23 (keeps 77)
    assert simlayer_budgets([0.9, 0.4, 0.6], [100, 100, 100], 2, 1 / 3, 11, None, 13)[:, 0].tolist() == [11, 77, 11]
    # keep 0.05: 15 per head of 3 layers, less than three windows (33): every layer lazy, windows shrunk alike
    assert simlayer_budgets([0.9, 0.4, 0.6], [100, 100, 100], 2, 0.05, 11, None, 13)[:, 0].tolist() == [5, 5, 5]


def test_a_lazy_layer_keeps_the_initial_and_the_most_recent_tokens():
    method = methods.load("simlayerkv", "scorer.n_initial=2", "scorer.recent=4", "allocator.rule=threshold",
                          "allocator.lazy_threshold=0.1")
    q = torch.zeros(1, 4, 20, 4)
    keys = torch.randn(1, 2, 20, 4, generator=torch.Generator().manual_seed(1))
    # zero queries: 1/20 on each key; the own column dropped, the first 2 and last 4 of the other 19: 6/20
    scores = method.scorer.score(layer_inputs(q, keys))
    assert method.scorer.laziness[0] == pytest.approx(6 / 20)
    budgets, kept = method.plan([scores], 0.5)
    assert budgets.tolist() == [[5, 5]] and kept[0].tolist() == [[0, 1, 17, 18, 19]] * 2


def test_preset_kvpress_is_the_threshold_rule_and_a_given_threshold_survives_it():
    m = methods.load("simlayerkv", "preset=kvpress", "allocator.lazy_threshold=0.9")
    assert (m.allocator.rule, m.allocator.lazy_threshold, m.budget_rule) == ("threshold", 0.9, "kvpress")
    assert methods.load("simlayerkv").allocator.rule == "budget"


def test_the_allocator_needs_its_scorer():
    with pytest.raises(KvbenchError, match="method.scorer='snapkv' does not"):
        methods.load("simlayerkv", "scorer=snapkv")


def test_bad_values_are_one_line(capsys, tmp_path):
    from conftest import refused_in_process

    for arg in ("method.allocator.lazy_threshold=1.5", "method.allocator.rule=lazy", "method.scorer.recent=0",
                "method.scorer=snapkv"):
        refused_in_process(capsys, "method=simlayerkv", arg, "model=tiny-random", "n_samples=1",
                           f"hydra.run.dir={tmp_path / 'r'}")
        assert not (tmp_path / "r").exists()
