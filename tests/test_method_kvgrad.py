"""KVgrad (methods/kvgrad.py): the score's factors by hand, and what its backward passes must leave alone (the
weights' gradients and flags, the prefill cache)."""
import math

import pytest
import torch

import methods
from methods.kvgrad import attribution_scores, reconstruction_probs


def test_reconstruction_probs_by_hand():
    # d = 2 (scale 1/sqrt 2), one head; cache keys k0..k2, one reconstruction token r0 (its own key appended);
    # one sink: the softmax is over k0, the chunk k1 k2, and r0; the chunk's columns come back
    keys = torch.tensor([[[[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]]])
    query = torch.tensor([[[[1.0, 1.0]]]])
    probs = reconstruction_probs(query, keys, 1, 1, 3)
    logits = torch.tensor([1.0, 2.0, 0.0, 1.0]) / math.sqrt(2)
    want = logits.softmax(-1)[1:3]
    assert probs[0, 0, 0].tolist() == pytest.approx(want.tolist())
    # two reconstruction tokens: the first does not see the second (causal), the second sees both
    keys2 = torch.cat([keys, torch.tensor([[[[5.0, 5.0]]]])], dim=2)
    queries = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])
    first = reconstruction_probs(queries, keys2, 1, 1, 3)[0, 0, 0]
    assert first.tolist() == pytest.approx(want.tolist())


def test_attribution_scores_by_hand():
    # one KV head, two query heads (a group), two reconstruction rows, two chunk entries:
    # S_c = max over (head, row) of A[head, row, c] * |v W_O|[head, c] * |grad a|[row]
    probs = torch.tensor([[[[0.5, 0.1], [0.2, 0.6]], [[0.1, 0.3], [0.4, 0.2]]]])  # [1, H_q=2, n=2, chunk=2]
    value_norms = torch.tensor([[[1.0, 2.0], [3.0, 1.0]]])  # [1, H_q, chunk]
    grad_norms = torch.tensor([[2.0, 1.0]])  # [1, n]
    got = attribution_scores(probs, value_norms, grad_norms, 1)
    # entry 0: head 0 (0.5*1*2, 0.2*1*1), head 1 (0.1*3*2, 0.4*3*1) -> max 1.2; entry 1: head 0 (0.1*2*2, 0.6*2*1),
    # head 1 (0.3*1*2, 0.2*1*1) -> max 1.2
    assert got[0, 0].tolist() == pytest.approx([1.2, 1.2])
    # the second row's output does not move the objective: only row 0 counts, entry 0 max(0.5*1, 0.1*3) = 0.5,
    # entry 1 max(0.1*2, 0.3*1) = 0.3
    grad_norms = torch.tensor([[1.0, 0.0]])
    assert attribution_scores(probs, value_norms, grad_norms, 1)[0, 0].tolist() == pytest.approx([0.5, 0.3])


def test_kvgrad_leaves_weights_and_cache_alone(tiny_llama):
    from harness.attention import install
    from harness.pipeline import prefill

    model, _ = tiny_llama
    flags = [p.requires_grad for p in model.parameters()]
    method = methods.load("kvgrad", chunk_size=16)
    ids = list(range(10, 50))
    with install(model) as hooks:
        pre = prefill(model, hooks, ids, method, seed=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for layer in pre.cache.layers:
        assert layer.keys.shape[2] == len(ids) and not layer.keys.requires_grad and not layer.values.requires_grad
    # every chunk was scored: no entry but the first chunk's would be 0 after a forward (the chunks start at 0)
    assert all(bool((s[..., 4:] > 0).all()) for s in pre.scores)
    _, kept = method.plan(pre.scores, 0.25)
    assert all(bool((torch.as_tensor(h)[:4] == torch.arange(4)).all()) for k in kept if k is not None
               for h in (k if isinstance(k, list) else k.unbind(0)))  # the 4 sinks are always kept
