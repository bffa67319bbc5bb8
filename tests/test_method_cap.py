"""CapKV (methods/cap.py) by hand: relevance weights from the query anchor, leverage in the capacity matrix (a value
direction already covered adds little), the sinks kept."""
import math

import pytest
import torch
from conftest import layer_inputs

import methods


def no_rope(x, positions):
    """A rotary embedding that rotates nothing (cos 1, sin 0), so pre- and post-RoPE vectors coincide."""
    shape = (1, positions.shape[-1], x.shape[-1])
    return torch.ones(shape), torch.zeros(shape)


def inputs(queries, keys, values):
    layer = layer_inputs(queries, keys, values)
    layer.rotary = no_rope
    return layer


def test_cap_by_hand():
    # along the first axis (d = 2, second coordinates 0): the anchor is +1, keys +1, -1, +2 -> cos = 1, -1, 1
    # -> w = exp(5 (c - 1)) = 1, e^-10, 1; values 1, 3, 2 -> A_00 = 1 + 1 + 9 e^-10 + 4 (epsilon 0),
    # s_i = w_i v_i^2 / A_00
    method = methods.load("cap", n_sink=0, epsilon=0.0)
    axis = lambda *xs: torch.tensor([[[[x, 0.0] for x in xs]]])
    scores = method.scorer.score(inputs(axis(1.0, 1.0, 1.0), axis(1.0, -1.0, 2.0), axis(1.0, 3.0, 2.0)))
    w1 = math.exp(-10)
    a = 1 + 1 + 9 * w1 + 4
    assert scores[0, 0].tolist() == pytest.approx([1 / a, 9 * w1 / a, 4 / a], rel=1e-5)
    _, kept = method.plan([scores], 0.34)
    assert kept[0].tolist() == [[2]]


def test_cap_prefers_a_value_direction_not_yet_covered():
    # tau 0: equal weights. Two entries share the value direction (1, 0), one has (0, 1), all of norm 1:
    # A = I + diag(2, 1) = diag(3, 2), so the duplicates score 1/3 each and the new direction 1/2
    method = methods.load("cap", n_sink=0, epsilon=0.0, tau=0.0)
    values = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]])
    scores = method.scorer.score(inputs(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), values))
    assert scores[0, 0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 2])
    _, kept = method.plan([scores], 1 / 3)
    assert kept[0].tolist() == [[2]]


def test_cap_sinks_and_anchor():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 12, 4), torch.randn(1, 2, 12, 4), torch.randn(1, 2, 12, 4)
    method = methods.load("cap")  # 4 sinks: out of the anchor and the capacity, scored max + 1
    scores = method.scorer.score(inputs(q, k, v))
    assert method.scorer.n_sink == 4
    assert torch.equal(scores[..., :4], torch.full((1, 2, 4), float(scores[..., 4:].max()) + 1))
    # the sinks' queries do not move the anchor: changing them changes nothing
    q2 = q.clone()
    q2[:, :, :4] = 100.0
    assert torch.equal(method.scorer.score(inputs(q2, k, v)), scores)
    # nothing but sinks: all kept alike
    assert torch.equal(method.scorer.score(inputs(q[:, :, :3], k[:, :, :3], v[:, :, :3])), torch.zeros(1, 2, 3))
