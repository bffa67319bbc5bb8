"""KeyDiff against a hand-computed case (kvpress 0.5.5's KeyDiffPress on the tiny models:
tests/test_conformance_extra.py, group keydiff)."""
import math

import pytest
import torch
from conftest import layer_inputs

import methods


def test_keydiff_by_hand():
    # one head: three keys along x (norms 1, 1, 2) and one along y; the anchor (mean of the unit keys) is
    # (0.75, 0.25), so cos = 0.75 / sqrt(0.625) for the x keys and 0.25 / sqrt(0.625) for the y key
    keys = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]]])
    method = methods.load("keydiff")
    scores = method.scorer.score(layer_inputs(torch.zeros(1, 1, 4, 2), keys))
    x, y = 0.75 / math.sqrt(0.625), 0.25 / math.sqrt(0.625)
    assert scores[0, 0].tolist() == pytest.approx([-x, -x, -y, -x])
    _, kept = method.plan([scores], 0.25)
    assert kept[0].tolist() == [[2]]  # the distinctive key is the one kept
