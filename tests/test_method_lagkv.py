"""LagKV (methods/lagkv.py): the lag-relative score by hand, the partition ranks, sinks and tail, the short-prompt
fallback, the kept set through plan, and the kvpress preset."""
import math

import pytest
import torch
from conftest import layer_inputs

import methods
from methods.lagkv import lag_relative_scores


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_lag_relative_score_by_hand():
    # lag 2, one head, 2 channels. Partition 0: a = [0, 0], b = [1, 3]; its reference (partition 1) has per-channel
    # min [0, 0], max [2, 2]: a -> [0, 0] (std 0), b -> [0.5, 1.5] (std |0.5 - 1.5| / sqrt 2); softmax over {a, b}.
    states = torch.tensor([[0.0, 0.0], [1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])[None, None]
    scores = lag_relative_scores(states, 2)
    assert scores.shape == (1, 1, 1, 2)
    s = 1 / math.sqrt(2)
    assert scores[0, 0, 0].tolist() == pytest.approx([1 - sigmoid(s), sigmoid(s)])


def _tokens(a: list[float]) -> torch.Tensor:
    # token a -> [a, -a]: normalised by a reference with min lo, max hi, the two channels differ by
    # (2a - lo - hi) / (hi - lo), so the std is |2a - lo - hi| / ((hi - lo) sqrt 2)
    return torch.tensor([[x, -x] for x in a])[None, None]


A = [0.0, 2.5, 1.0, 2.0, 5.0, 1.0, 0.0, 4.0]  # partitions of 2: P0 = {0, 2.5}, P1 = {1, 2}, P2 = {5, 1}, P3 = {0, 4}


def test_partitions_scored_against_their_successor_ranked_and_tail_kept():
    keys = _tokens(A)
    scorer = methods.load("lagkv", n_sink=0, lag_size=2).scorer
    # T = 8, no sinks: 4 partitions; P0..P2 are scored (P3 has no successor and is the tail, score 1).
    # P0 vs P1 (lo 1, hi 2): |0 - 3| = 3 > |5 - 3| = 2 -> token 0 ranks first; P1 vs P2 (lo 1, hi 5): token 2
    # (|2 - 6| / 4 = 1 > 0.5); P2 vs P3 (lo 0, hi 4): token 4 (|10 - 4| / 4 = 1.5 > 0.5). Ranks / lag: 1/2, 0.
    ranked = scorer.score(layer_inputs(keys, keys))
    assert ranked[0, 0].tolist() == [0.5, 0.0, 0.5, 0.0, 0.5, 0.0, 1.0, 1.0]
    # cross_scoring keeps the softmaxed stds (keys = values, so their mean is the key score)
    scorer.cross_scoring = True
    raw = scorer.score(layer_inputs(keys, keys))[0, 0].tolist()
    d0, d1, d2 = 1 / math.sqrt(2), 0.5 / math.sqrt(2), 1 / math.sqrt(2)  # std differences inside P0, P1, P2
    expected = [sigmoid(d0), 1 - sigmoid(d0), sigmoid(d1), 1 - sigmoid(d1), sigmoid(d2), 1 - sigmoid(d2), 1, 1]
    assert raw == pytest.approx(expected, abs=1e-6)


def test_kept_set_takes_the_same_share_of_every_partition():
    keys = _tokens(A)
    method = methods.load("lagkv", n_sink=0, lag_size=2)
    scores = method.scorer.score(layer_inputs(keys, keys))
    _, kept = method.plan([scores], 5 / 8)  # 5 of 8: the tail (6, 7) and the winner of each partition
    assert kept[0].tolist() == [[0, 2, 4, 6, 7]]


def test_values_weigh_with_score_v_ratio():
    # keys favour token 0 of P0, values favour token 1 (the reversed order of A inside each partition)
    keys = _tokens(A)
    values = _tokens([2.5, 0.0, 2.0, 1.0, 1.0, 5.0, 4.0, 0.0])
    # values: P0 = {2.5, 0} vs P1 = {2, 1} (lo 1, hi 2): |5 - 3| = 2 < |0 - 3| = 3 -> token 1 ranks first
    key_only = methods.load("lagkv", n_sink=0, lag_size=2, score_v_ratio=0.0).scorer
    assert key_only.score(layer_inputs(keys, keys, values))[0, 0, :2].tolist() == [0.5, 0.0]
    heavy_values = methods.load("lagkv", n_sink=0, lag_size=2, score_v_ratio=10.0).scorer
    assert heavy_values.score(layer_inputs(keys, keys, values))[0, 0, :2].tolist() == [0.0, 0.5]


def test_sinks_score_one_and_follow_the_selector():
    keys = _tokens([9.0, 8.0] + A)  # two sinks before the partitions of A
    method = methods.load("lagkv", "selector.n_sink=2", lag_size=2)
    assert method.scorer.n_sink == 2 and method.selector.n_sink == 2
    scores = method.scorer.score(layer_inputs(keys, keys))
    assert scores[0, 0].tolist() == [1.0, 1.0, 0.5, 0.0, 0.5, 0.0, 0.5, 0.0, 1.0, 1.0]
    # T = 11: the remainder after the last whole partition joins the tail
    keys = _tokens([9.0, 8.0] + A + [3.0])
    assert method.scorer.score(layer_inputs(keys, keys))[0, 0, -3:].tolist() == [1.0, 1.0, 1.0]


def test_short_prompt_keeps_the_sinks_then_the_most_recent():
    # T = 5 < n_sink + 2 lag = 6: no partition has a reference; sinks 1, then (i - n_sink) / (T - n_sink)
    keys = torch.randn(1, 2, 5, 4)
    scorer = methods.load("lagkv", n_sink=2, lag_size=2).scorer
    scores = scorer.score(layer_inputs(keys, keys))
    assert scores[0, 1].tolist() == pytest.approx([1.0, 1.0, 0.0, 1 / 3, 2 / 3])
    method = methods.load("lagkv", n_sink=2, lag_size=2)
    _, kept = method.plan([scores], 0.8)
    assert kept[0].tolist() == [[0, 1, 3, 4]] * 2


def test_defaults_and_kvpress_preset():
    ours = methods.load("lagkv")
    assert (ours.scorer.n_sink, ours.selector.n_sink, ours.scorer.lag_size, ours.budget_rule) == (16, 16, 128, "floor")
    kv = methods.load("lagkv", preset="kvpress")
    assert (kv.scorer.n_sink, kv.selector.n_sink, kv.scorer.lag_size, kv.budget_rule) == (4, 4, 128, "kvpress")
    # a lag given with the preset stays (the preset does not set it)
    assert methods.load("lagkv", preset="kvpress", lag_size=32).scorer.lag_size == 32


def test_a_constant_reference_channel_does_not_divide_by_zero():
    states = torch.tensor([[1.0, 0.0], [2.0, 5.0], [7.0, 0.0], [7.0, 1.0]])[None, None]  # channel 0 constant in P1
    scores = lag_relative_scores(states, 2)
    assert torch.isfinite(scores).all()
