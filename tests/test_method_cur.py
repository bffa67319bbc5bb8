"""CurDKV (methods/cur.py): local windows by hand in both alignments, the leverage combinations, the kept set
through plan, the random projection's generator, and the kvpress preset."""
import pytest
import torch
from conftest import layer_inputs

import methods
from methods.cur import local_share


def test_local_share_by_hand_in_both_alignments():
    scores = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]])
    # start (kvpress): windows [1, 2], [3, 4], [5 + zero padding]
    assert local_share(scores, 2, "start")[0, 0].tolist() == pytest.approx([1 / 3, 2 / 3, 3 / 7, 4 / 7, 1.0])
    # end (CurDKV code, left padding): [padding + 1], [2, 3], [4, 5]
    assert local_share(scores, 2, "end")[0, 0].tolist() == pytest.approx([1.0, 2 / 5, 3 / 5, 4 / 9, 5 / 9])
    # a length that is a multiple of the window: both alignments agree
    even = scores[..., :4]
    assert local_share(even, 2, "end").tolist() == local_share(even, 2, "start").tolist()


def _kv(k2: list[float], v2: list[float]):
    """Keys and values whose squared norms are k2 and v2 (one head), spread over two channels."""
    k = torch.tensor([[x ** 0.5 * 0.6, x ** 0.5 * 0.8] for x in k2])[None, None]
    v = torch.tensor([[0.0, x ** 0.5] for x in v2])[None, None]
    return k, v


@pytest.mark.parametrize("kind, expected", [
    # k2 = [1, 3, 2, 2] -> window shares [1/4, 3/4, 1/2, 1/2]; v2 = [1, 1, 3, 1] -> [1/2, 1/2, 3/4, 1/4]
    ("key", [1 / 8, 3 / 8, 2 / 8, 2 / 8]),
    ("value", [1 / 4, 1 / 4, 3 / 8, 1 / 8]),
    ("kv_avg", [0.1875, 0.3125, 0.3125, 0.1875]),
    ("kv_product", [0.125, 0.375, 0.375, 0.125]),
])
def test_leverage_types_by_hand(kind, expected):
    k, v = _kv([1, 3, 2, 2], [1, 1, 3, 1])
    scorer = methods.load("cur", leverage_type=kind, local_window_size=2).scorer
    assert scorer.score(layer_inputs(k, k, v))[0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_without_local_windows_the_squared_norms_are_shared_over_the_sequence():
    k, v = _kv([1, 3, 2, 2], [1, 1, 3, 1])
    scorer = methods.load("cur", use_local_approximation=False).scorer
    product = [1 * 1, 3 * 1, 2 * 3, 2 * 1]
    assert scorer.score(layer_inputs(k, k, v))[0, 0].tolist() == pytest.approx([p / 12 for p in product], abs=1e-6)


def test_window_alignment_changes_the_kept_set():
    # k2 = 1..5, unit values: kv_product = key shares x value shares, normalised (both sums are 2 here)
    k, v = _kv([1, 2, 3, 4, 5], [1, 1, 1, 1, 1])
    start = methods.load("cur", "selector.n_sink=1", local_window_size=2, preset="kvpress")
    end = methods.load("cur", "selector.n_sink=1", local_window_size=2)
    s_start = start.scorer.score(layer_inputs(k, k, v))
    s_end = end.scorer.score(layer_inputs(k, k, v))
    assert s_start[0, 0].tolist() == pytest.approx([1 / 12, 1 / 6, 3 / 28, 1 / 7, 1 / 2], abs=1e-6)
    assert s_end[0, 0].tolist() == pytest.approx([1 / 2, 1 / 10, 3 / 20, 1 / 9, 5 / 36], abs=1e-6)
    # 3 of 5 with one sink: start keeps 4 (1/2) and 1 (1/6); end keeps 2 (3/20) and 4 (5/36)
    assert start.plan([s_start], 0.6)[1][0].tolist() == [[0, 1, 4]]
    assert end.plan([s_end], 0.6)[1][0].tolist() == [[0, 2, 4]]


def test_random_projection_draws_from_the_layer_generator():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    scorer = methods.load("cur", use_random_leverage=True, sketch_dimension=3).scorer
    one = scorer.score(layer_inputs(k, k, v, seed=1))
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(one, scorer.score(layer_inputs(k, k, v, seed=1)))
    assert not torch.allclose(one, scorer.score(layer_inputs(k, k, v, seed=2)))
    # without the projection, the seed does not matter
    plain = methods.load("cur").scorer
    assert torch.equal(plain.score(layer_inputs(k, k, v, seed=1)), plain.score(layer_inputs(k, k, v, seed=2)))


def test_defaults_sinks_and_kvpress_preset():
    ours = methods.load("cur")
    assert (ours.scorer.window_align, ours.selector.n_sink, ours.scorer.local_window_size, ours.budget_rule) == (
        "end", 4, 16, "floor")
    kv = methods.load("cur", preset="kvpress")
    assert (kv.scorer.window_align, kv.selector.n_sink, kv.budget_rule) == ("start", 4, "kvpress")
    torch.manual_seed(0)
    k = torch.randn(1, 2, 64, 8)
    _, kept = ours.plan([ours.scorer.score(layer_inputs(k, k))], 0.25)
    assert all(set(range(4)) <= set(h.tolist()) for h in kept[0])  # the 4 sinks always kept
