"""Finch (methods/finch.py): the question's attention by hand, the position weighting, and the question length the
harness gives the scorer (``Scorer.begin_prefill``)."""
import math

import pytest
import torch
from conftest import layer_inputs

import methods
from harness.compress import Scorer


def test_finch_by_hand():
    # three tokens, one head, the question is the last token: its query (1, 0) meets keys (2, 0), 0, 0
    q = torch.tensor([[[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]]])
    k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]])
    scorer = methods.load("finch").scorer
    scorer.begin_prefill([7, 8, 9], 1)
    e = math.exp(2 * 2 ** -0.5)
    p0, p1 = e / (e + 2), 1 / (e + 2)
    # normalize: the query at position 2 weighs its row by 2; the question itself scores max + 1
    assert scorer.score(layer_inputs(q, k))[0, 0].tolist() == pytest.approx([2 * p0, 2 * p1, 2 * p0 + 1])
    plain = methods.load("finch", normalize=False).scorer
    plain.begin_prefill([7, 8, 9], 1)
    assert plain.score(layer_inputs(q, k))[0, 0].tolist() == pytest.approx([p0, p1, p0 + 1])


def test_finch_position_weighting_changes_the_choice():
    # window of two queries (positions 2 and 3) over prefix tokens 0 and 1: query 2 prefers token 0, query 3
    # token 1 a little less strongly; weighing query 3's row by 3 against query 2's by 2 flips the choice
    q = torch.zeros(1, 1, 4, 2)
    q[0, 0, 2] = torch.tensor([1.0, 0.0])
    q[0, 0, 3] = torch.tensor([0.0, 0.9])
    k = torch.tensor([[[[3.0, 0.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]]]])
    probs = lambda i: torch.softmax(q[0, 0, i] @ k[0, 0, : i + 1].T * 2 ** -0.5, dim=-1)
    p2, p3 = probs(2), probs(3)
    chosen = {}
    for normalize in (True, False):
        method = methods.load("finch", normalize=normalize)
        method.scorer.begin_prefill([0] * 4, 2)
        scores = method.scorer.score(layer_inputs(q, k))
        w2, w3 = (2.0, 3.0) if normalize else (1.0, 1.0)
        want = [(w2 * p2[j] + w3 * p3[j]) / 2 for j in range(2)]
        assert scores[0, 0, :2].tolist() == pytest.approx([float(x) for x in want])
        _, kept = method.plan([scores], 0.75)  # 3 of 4: the question (2 entries) and one prefix token
        chosen[normalize] = kept[0][0].tolist()
    assert chosen == {False: [0, 2, 3], True: [1, 2, 3]}


def test_finch_window_is_the_question_or_the_fallback():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 40, 4), torch.randn(1, 1, 40, 4)
    method = methods.load("finch", window=8)
    method.scorer.begin_prefill(list(range(40)), 5)  # query-aware: the 5 question tokens are the window
    scores = method.scorer.score(layer_inputs(q, k))
    top = float(scores[..., :35].max())
    assert torch.equal(scores[0, 0, 35:], torch.full((5,), top + 1))
    method.scorer.begin_prefill(list(range(40)), 0)  # query-agnostic: the last `window` tokens observe
    scores = method.scorer.score(layer_inputs(q, k))
    assert torch.equal(scores[0, 0, 32:], torch.full((8,), float(scores[..., :32].max()) + 1))
    _, kept = method.plan([scores], 0.25)
    assert set(range(32, 40)) <= set(kept[0][0].tolist())


def test_the_pipeline_names_the_question(tiny_llama):
    from harness.attention import install
    from harness.pipeline import run_sample

    model, tokenizer = tiny_llama
    seen = []
    method = methods.load("finch")
    method.scorer.begin_prefill = lambda ids, n_question: seen.append((len(ids), n_question))
    ctx, question = list(range(5, 45)), list(range(50, 56))
    with install(model) as hooks:
        for aware in (True, False):
            run_sample(model, tokenizer, hooks, method, ctx, question, [0.5], aware, 1, [], 0)
    assert seen == [(46, 6), (40, 0)]
    assert "begin_prefill" in vars(Scorer)
