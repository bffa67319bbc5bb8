"""Per-layer keep ratios (allocator per_layer, methods/per_layer.py) and the composition of two scorers (scorer
composed, methods/composed.py): budgets and kept sets by hand."""
from __future__ import annotations

import pytest
import torch

import methods
from harness.compress import LayerInputs, Method, Scorer, Selector, UniformAllocator
from harness.errors import KvbenchError
from methods.composed import ComposedScorer
from methods.per_layer import PerLayerAllocator


def test_per_layer_budgets_by_hand():
    scores = [torch.zeros(2, 100), torch.zeros(2, 100), torch.zeros(2, 80)]
    absolute = PerLayerAllocator(keep_ratios=[1.0, 0.5, 0.1])
    assert absolute.budgets(scores, 0.25).tolist() == [[100, 100], [50, 50], [8, 8]]  # the run's ratio unused
    absolute.budget_rule = "kvpress"  # int(T * (1 - cr)), cr = 1 - 0.1 in float: 80 * 0.09999999999999998 -> 7
    assert absolute.budgets(scores, 0.25).tolist() == [[100, 100], [50, 50], [7, 7]]
    relative = PerLayerAllocator(keep_ratios=[2.0 / 3, 1.0 / 3, 1.0 / 3], relative=True)  # mean 4/9
    # keep 0.25: 0.25 * r / (4/9) = 0.375, 0.1875, 0.1875 -> 37, 18, 15
    assert relative.budgets(scores, 0.25).tolist() == [[37, 37], [18, 18], [15, 15]]
    assert PerLayerAllocator().budgets(scores, 0.25).tolist() == [[25, 25], [25, 25], [20, 20]]  # null: uniform
    with pytest.raises(KvbenchError, match="2 entries for 3 scored layers"):
        PerLayerAllocator(keep_ratios=[0.5, 0.5]).budgets(scores, 0.5)


def test_per_layer_config():
    m = methods.load("snapkv", "allocator=per_layer", "allocator.keep_ratios=[1.0,0.5]")
    assert m.name == "snapkv+per_layer" and m.allocator.keep_ratios == [1.0, 0.5] and not m.allocator.relative
    with pytest.raises(KvbenchError, match="method.allocator.keep_ratios"):
        methods.load("snapkv", "allocator=per_layer", "allocator.keep_ratios=[1.5]")


class Fixed(Scorer):
    def __init__(self, scores):
        self.scores = torch.as_tensor(scores, dtype=torch.float32)
        self.seen = None

    def score(self, inputs):
        self.seen = inputs.keys.clone()
        return self.scores[None]


class KeyValue(Scorer):
    """Scores each entry by its key's first channel (what the second stage sees: the first stage's keys)."""

    def __init__(self):
        self.seen = None

    def score(self, inputs):
        self.seen = inputs.keys.clone()
        return inputs.keys[..., 0].float()


def test_composed_second_scorer_sees_the_first_stages_entries():
    # 6 tokens, 1 head: the first scorer keeps its top 4 (first_keep 2/3): tokens 0, 1, 2, 3; the second scores
    # them by their key (token t has key t * 10 in channel 0 but token 0's is 100): keep 2 -> tokens 0 and 3.
    keys = (torch.arange(6.0) * 10).reshape(1, 1, 6, 1).repeat(1, 1, 1, 2)
    keys[0, 0, 0] = 100.0
    first, second = Fixed([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]]), KeyValue()
    scorer = ComposedScorer(base=first, second=second, first_keep=4 / 6)
    method = Method("m", scorer, UniformAllocator(), Selector())
    inputs = LayerInputs(0, 1, torch.zeros(1, 1, 6, 2), keys, keys.clone(), None, torch.Generator())
    scores = scorer.score(inputs)
    assert second.seen[0, 0, :, 0].tolist() == [100.0, 10.0, 20.0, 30.0]  # only the first stage's keys
    assert scores[0, 0, 4:].isneginf().all()
    budgets, kept = method.plan([scores], 2 / 6)
    assert kept[0].tolist() == [[0, 3]]  # the first scorer alone keeps 0, 1
    # protected tokens survive both stages: n_recent 1 keeps token 5 in stage 1 and in the budget
    method = Method("m", scorer, UniformAllocator(), Selector(n_recent=1))
    scores = scorer.score(inputs)
    assert second.seen[0, 0, :, 0].tolist() == [100.0, 10.0, 20.0, 50.0]  # stage 1: 5 (protected), 0, 1, 2
    assert method.plan([scores], 2 / 6)[1][0].tolist() == [[0, 5]]


def test_composed_config():
    m = methods.load("snapkv", "scorer=composed", "scorer.second=tova", "scorer.first_keep=0.8")
    assert m.name == "composed(snapkv,tova)" and m.scorer.first_keep == 0.8
    m = methods.load("snapkv", "scorer=composed", "scorer.second=snapkv", "scorer.second.window=8", preset="kvpress")
    assert m.scorer.second.window == 64 and m.scorer.base.window == 64 and m.budget_rule == "kvpress"
    assert m.scorer.second.budget_rule == "kvpress"
    with pytest.raises(KvbenchError, match="method.scorer.second.windw is not a key"):
        methods.load("snapkv", "scorer=composed", "scorer.second=snapkv", "scorer.second.windw=8")
