"""KeyDiff against a hand-computed case and against kvpress 0.5.5's KeyDiffPress (fixture written by
tools/conformance/dump_keydiff.py in kvpress's environment)."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import layer_inputs

import methods

FIXTURE = Path(__file__).parent / "fixtures" / "kvpress" / "keydiff.json"


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


def test_keydiff_matches_kvpress():
    data = json.loads(FIXTURE.read_text())
    keys = torch.tensor(data["keys"])
    method = methods.load("keydiff", preset="kvpress")
    scores = method.scorer.score(layer_inputs(torch.zeros(1, 4, keys.shape[2], keys.shape[3]), keys))
    assert torch.allclose(scores, torch.tensor(data["scores"]), atol=1e-6)
    _, kept = method.plan([scores], 1 - 0.75)
    assert kept[0].tolist() == data["kept"][0]
