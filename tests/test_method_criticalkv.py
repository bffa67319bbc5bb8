"""CriticalKV / CriticalAdaKV (methods/criticalkv.py) and the wrapping-scorer contract (harness.compress.WrappedScorer,
Scorer.rerank, methods' recursive base configs): hand-computed value norms, two-stage selections, presets and
errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import methods
from harness.compress import LayerInputs, Method, Scorer, Selector, UniformAllocator, WrappedScorer
from harness.errors import KvbenchError
from methods.adakv import AdaKVAllocator
from methods.criticalkv import CriticalKVScorer, output_norms, two_stage_scores


class Fixed(Scorer):
    """A base scorer returning given scores, recording what the wrapper forwards to it."""

    needs_hidden_states = True
    shares_across_ratios = False

    def __init__(self, scores):
        self.scores = torch.as_tensor(scores, dtype=torch.float32)
        self.calls = []

    def score(self, inputs):
        return self.scores[None]

    def input_files(self):
        return {"method.scorer.checkpoint": Path("/tmp/x")}

    def begin_prefill(self, ids, n_question):
        self.calls.append(("begin_prefill", n_question))

    def row_extras(self):
        return {"base": 1}


class OProj(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.o_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.o_proj.weight.copy_(weight)


def inputs(values, module, n_tokens):
    keys = torch.zeros(1, values.shape[1], n_tokens, values.shape[-1])
    return LayerInputs(layer_idx=0, n_layers=1, queries=torch.zeros(1, 2 * values.shape[1], n_tokens, values.shape[-1]),
                       keys=keys, values=values, module=module, generator=torch.Generator())


def test_output_norms_by_hand():
    # 1 KV head, 2 query heads (g = 2), head_dim 2, hidden 2. W_o = [[1, 0, 2, 0], [0, 1, 0, -1]] (hidden x H_q*D):
    # query head 0 uses columns 0-1 (identity), query head 1 columns 2-3 (diag(2, -1)).
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
    values = torch.tensor([[[[1.0, 2.0], [-3.0, 0.5]]]])  # [1, 1, T=2, 2]
    norms = output_norms(values, OProj(weight))
    # token 0: head 0 |1|+|2| = 3, head 1 |2|+|-2| = 4 -> mean 3.5; token 1: 3.5 and 6.5 -> 5
    assert torch.allclose(norms, torch.tensor([[[3.5, 5.0]]]))
    # chunking over tokens changes nothing
    assert torch.equal(output_norms(values, OProj(weight), chunk_elems=1), norms)


def plan(scorer, n_tokens, keep_ratio, allocator=None, selector=Selector(), values=None, weight=None):
    weight = torch.eye(2) if weight is None else weight  # 1 query head per KV head, head_dim 2, W_o = identity
    if values is None:
        values = torch.ones(1, scorer.base.scores.shape[0], n_tokens, 2)
    method = Method("m", scorer, allocator or UniformAllocator(), selector)
    scores = scorer.score(inputs(values, OProj(weight.repeat(1, scorer.base.scores.shape[0])), n_tokens))
    return method.plan([scores], keep_ratio)


def kept_sets(kept):
    layer = kept[0]
    rows = list(layer) if isinstance(layer, list) else list(layer.unbind(0))
    return [sorted(int(i) for i in r) for r in rows]


def test_two_stages_by_hand():
    # base scores 5 4 3 2 1 0, value norms 1 1 1 10 1 1 (values (v, 0) with W_o = I: ||v||_1 = |v|)
    base = Fixed([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    values = torch.tensor([1.0, 1, 1, 10, 1, 1]).reshape(1, 1, 6, 1) * torch.tensor([1.0, 0.0])
    scorer = CriticalKVScorer(base=base)
    # budget 3 (keep 0.5): stage 1 = max(1, int(3 * 0.5)) = 1 entry by the base (token 0); stage 2 by
    # (s + 1e-4) * norm = 4, 3, 20, 1, 0 over tokens 1..5: tokens 3 and 1. The base alone keeps 0, 1, 2.
    _, kept = plan(scorer, 6, 0.5, values=values, weight=torch.eye(2)[:, :2])
    assert kept_sets(kept) == [[0, 1, 3]]
    # first_stage_ratio 1: the base's own top-3
    _, kept = plan(CriticalKVScorer(base=base, first_stage_ratio=1.0), 6, 0.5, values=values, weight=torch.eye(2))
    assert kept_sets(kept) == [[0, 1, 2]]
    # first_stage_ratio 0: all three by the second score: tokens 3 (20), 1 (4.0001), 0 (5.0001)
    _, kept = plan(CriticalKVScorer(base=base, first_stage_ratio=0.0), 6, 0.5, values=values, weight=torch.eye(2))
    assert kept_sets(kept) == [[0, 1, 3]]
    # the scores the selector sees: stage 1 at +inf, the rest (s + eps) * norm
    got = two_stage_scores(base.scores, torch.tensor([[1.0, 1, 1, 10, 1, 1]]), torch.tensor([3]), 1e-4, 0.5)
    assert got[0, 0] == math.inf and torch.allclose(got[0, 1:], torch.tensor([4.0001, 3.0001, 20.001, 1.0001, 1e-4]))


def test_protected_tokens_rank_first_in_stage_one_and_are_kept():
    # 6 tokens, the last 2 protected (n_recent 2), budget 4 (keep 4/6): stage 1 = int(4 * 0.5) = 2 entries, both
    # protected (+inf); the other 2 by (s + eps) * norm: norms make token 2 (3 * 10) and token 0 (5 * 1) win over
    # token 1 (4 * 1); the base alone (top-2 of the prefix) keeps 0 and 1.
    base = Fixed([[5.0, 4.0, 3.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([1.0, 1, 10, 1, 1, 1]).reshape(1, 1, 6, 1) * torch.tensor([1.0, 0.0])
    _, kept = plan(CriticalKVScorer(base=base), 6, 4 / 6, selector=Selector(n_recent=2), values=values)
    assert kept_sets(kept) == [[0, 2, 4, 5]]


def test_safeguard_keeps_the_allocator_floor_in_stage_one():
    # 2 heads, AdaKV budgets; head 0's scores rank its token 1 second by the base, but its value norm is 0, so
    # stage 2 alone would drop it. With safeguard 0.5 (mean budget 4 -> top-2 of each head forced) it stays.
    scores = [[9.0, 8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]]
    norms = torch.ones(2, 8)
    norms[0, 1] = 0.0
    budgets = torch.tensor([3, 5])
    plain = two_stage_scores(torch.tensor(scores), norms, budgets, 1e-4, 0.25)  # stage 1: 1 entry per head
    forced = two_stage_scores(torch.tensor(scores), norms, budgets, 1e-4, 0.25, safeguard=0.5)
    assert plain[0, 1] == pytest.approx(0.0, abs=1e-3) and forced[0, 1] == math.inf
    assert forced[1, :2].isinf().all() and not forced[1, 2].isinf()  # n_safe = max(1, int(4 * 0.5)) = 2


def test_adakv_budgets_come_from_the_base_scores():
    # critical_adakv: the allocator sees the base scores (AdaKV's global cut), not the second-stage ones
    base = Fixed([[10.0, 9.0, 8.0, 7.0], [1.0, 0.5, 0.2, 0.1]])
    budgets, kept = plan(CriticalKVScorer(base=base), 4, 0.5, allocator=AdaKVAllocator(alpha=0.5))
    # n_kept 2 per head, n_safe 1: floors 10 and 1, then the 2 best of the rest globally: 9 and 8 (head 0)
    assert budgets.tolist() == [[3, 1]]


def test_the_wrapper_forwards_every_extension_point():
    own = {n for n in vars(Scorer) if not n.startswith("_") and n != "PRESETS"}
    assert own <= set(vars(WrappedScorer)), f"WrappedScorer does not forward {sorted(own - set(vars(WrappedScorer)))}"
    base = Fixed([[1.0, 2.0]])
    wrapper = CriticalKVScorer(base=base)
    assert wrapper.needs_hidden_states and not wrapper.shares_across_ratios
    assert wrapper.input_files() == {"method.scorer.base.checkpoint": Path("/tmp/x")}
    assert wrapper.row_extras() == {"base": 1}
    wrapper.begin_prefill([1, 2], 1)
    assert base.calls == [("begin_prefill", 1)]
    Method("m", wrapper, UniformAllocator(), budget_rule="kvpress")
    assert base.budget_rule == "kvpress"  # the base counts with the method's rule too


def test_config_base_swaps_presets_and_labels():
    m = methods.load("criticalkv")
    assert m.name == "criticalkv(snapkv)" and (m.scorer.base.window, m.selector.n_recent) == (32, 32)
    m = methods.load("criticalkv", preset="kvpress")  # kvpress's wrapper values and SnapKV's own preset
    assert (m.scorer.base.window, m.scorer.base.kernel, m.scorer.base.pool) == (64, 5, "avg")
    assert (m.selector.n_recent, m.budget_rule, m.scorer.base.budget_rule) == (64, "kvpress", "kvpress")
    assert m.config["preset"] == "kvpress" and m.config["scorer"]["base"]["window"] == 32  # recorded as configured
    m = methods.load("criticalkv", "scorer.base=tova", "scorer.epsilon=0.5")
    assert m.name == "criticalkv(tova)" and type(m.scorer.base).__name__ == "TOVAScorer" and m.scorer.epsilon == 0.5
    m = methods.load("criticalkv", "scorer.base.window=16")
    assert m.scorer.base.window == 16 and m.config["scorer"]["base"] == {"name": "snapkv", "window": 16, "kernel": 7,
                                                                          "pool": "max"}
    m = methods.load("critical_adakv")
    assert m.name == "criticalkv(snapkv)+adakv" and m.scorer.safeguard == 0.2 == m.allocator.alpha
    m = methods.load("critical_adakv", "allocator.alpha=0.4")
    assert m.scorer.safeguard == 0.4  # the safeguard follows AdaKV's alpha
    m = methods.load("chunkkv", "scorer.base=criticalkv", "scorer.base.base=tova")  # wrappers nest
    assert m.name == "chunkkv(criticalkv(tova))"
    m = methods.load("criticalkv", label="mine")
    assert m.name == "mine"


@pytest.mark.parametrize("overrides, message", [
    (["scorer.base.windw=3"], "method.scorer.base.windw is not a key of method.scorer.base"),
    (["scorer.base.window=0"], "method.scorer.base.window=0 is out of range"),
    (["scorer.first_stage_ratio=1.5"], "method.scorer.first_stage_ratio=1.5 is out of range"),
    (["scorer.epsilon=-1"], "method.scorer.epsilon=-1 is out of range"),
    (["scorer.safeguard=2"], "method.scorer.safeguard=2 is out of range"),
    (["scorer.base=null"], "method.scorer.base must name the scorer that criticalkv wraps"),
    (["scorer.base.base=tova"], "method.scorer.base.base"),
])
def test_bad_wrapper_values_are_one_line_errors(overrides, message):
    with pytest.raises(KvbenchError) as err:
        methods.load("criticalkv", *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
