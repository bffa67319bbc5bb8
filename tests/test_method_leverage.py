"""Leverage scores (methods/leverage.py): exact leverage by hand, the sketch identity that decides when kvpress's
randomness matters, un-rotated keys, the layer z-score and the generator."""
import pytest
import torch
from conftest import layer_inputs

import methods
from methods.leverage import leverage_scores, prerope_keys


class IdentityRotary(torch.nn.Module):
    """cos 1, sin 0: RoPE that rotates nothing, so the cached keys are their own pre-RoPE keys."""

    def forward(self, x, position_ids):
        n, d = position_ids.shape[-1], x.shape[-1]
        return torch.ones(1, n, d), torch.zeros(1, n, d)


def inputs(keys, seed=0, queries=None, values=None):
    out = layer_inputs(keys if queries is None else queries, keys, values, seed=seed)
    out.rotary = IdentityRotary()
    return out


def test_exact_leverage_by_hand():
    # one channel: centred keys x = [-2, -1, 0, 1, 2], sum x^2 = 10, leverage x_i^2 / (10 + ridge)
    keys = torch.arange(5.0)[None, None, :, None]
    assert leverage_scores(keys, None, 0.0)[0, 0].tolist() == pytest.approx([0.4, 0.1, 0.0, 0.1, 0.4], abs=1e-6)
    assert leverage_scores(keys, None, 0.01)[0, 0].tolist() == pytest.approx([4 / 10.01, 1 / 10.01, 0, 1 / 10.01,
                                                                             4 / 10.01], abs=1e-6)
    # the leverages of a full-rank centred T x d matrix sum to d (the trace of a projection)
    torch.manual_seed(0)
    wide = torch.randn(1, 2, 30, 4, dtype=torch.float64)
    assert leverage_scores(wide, None, 0.0).sum(dim=-1)[0].tolist() == pytest.approx([4.0, 4.0], abs=1e-6)


def test_a_sketch_with_k_at_least_d_enters_only_through_the_ridge():
    # X Phi (Phi^T X^T X Phi + r I)^-1 Phi^T X^T = X (X^T X + r (Phi Phi^T)^-1)^-1 X^T for Phi of full row rank
    # (k >= d): at r = 0 (possible with a Cholesky solve only for k = d, else the Gram matrix is singular) the
    # sketched leverage is the exact one whatever Phi; for r > 0, Phi enters through r (Phi Phi^T)^-1 only
    torch.manual_seed(1)
    keys = torch.randn(1, 1, 40, 4, dtype=torch.float64)
    exact = leverage_scores(keys, None, 0.0)
    square = torch.randn(1, 1, 4, 4, dtype=torch.float64) / 2
    assert torch.allclose(leverage_scores(keys, square, 0.0), exact, atol=1e-8)
    x = keys[0, 0] - keys[0, 0].mean(dim=0)
    for k in (4, 12):
        phi = torch.randn(1, 1, 4, k, dtype=torch.float64) / k ** 0.5
        m_inv = torch.linalg.inv(phi[0, 0] @ phi[0, 0].T)
        ridge = x @ torch.linalg.solve(x.T @ x + 0.5 * m_inv, x.T)
        assert torch.allclose(leverage_scores(keys, phi, 0.5)[0, 0], ridge.diagonal(), atol=1e-8)
    # k < d: a real approximation, no longer the exact leverage
    phi = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    assert not torch.allclose(leverage_scores(keys, phi, 0.0), exact, atol=1e-3)


def test_prerope_keys_undo_the_rotary_embedding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    rotary = LlamaRotaryEmbedding(config)
    torch.manual_seed(2)
    pre = torch.randn(1, 2, 12, 8)
    cos, sin = rotary(pre, torch.arange(12)[None])
    rotated, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
    got = layer_inputs(rotated, rotated)
    got.rotary = rotary
    assert torch.allclose(prerope_keys(got), pre, atol=1e-5)
    assert torch.allclose(prerope_keys(got, 3, 9), pre[:, :, 3:9], atol=1e-5)  # positions follow the slice
    assert not torch.allclose(rotated, pre, atol=1e-2)


def test_scores_are_z_scored_over_the_layer_and_keep_each_heads_order():
    torch.manual_seed(3)
    keys = torch.randn(1, 2, 50, 4)
    keys[:, 1, :10] *= 4  # head 1 has outliers: its leverages spread more than head 0's
    scores = methods.load("leverage", sketch_dimension=None).scorer.score(inputs(keys))
    raw = leverage_scores(keys, None, 0.01)
    # one mean and std over both heads (kvpress), not one per head
    assert torch.allclose(scores, (raw - raw.mean()) / raw.std(), atol=1e-5)
    assert not torch.allclose(scores[:, 1], (raw[:, 1] - raw[:, 1].mean()) / raw[:, 1].std(), atol=1e-2)
    assert torch.equal(scores.argsort(dim=-1), raw.argsort(dim=-1))


def test_sketch_draws_from_the_layer_generator():
    torch.manual_seed(4)
    keys = torch.randn(1, 2, 50, 8)
    scorer = methods.load("leverage", sketch_dimension=3).scorer
    one = scorer.score(inputs(keys, seed=5))
    torch.manual_seed(99)
    assert torch.equal(one, scorer.score(inputs(keys, seed=5)))
    assert not torch.allclose(one, scorer.score(inputs(keys, seed=6)))
    exact = methods.load("leverage", sketch_dimension=None).scorer
    assert torch.equal(exact.score(inputs(keys, seed=5)), exact.score(inputs(keys, seed=6)))


def test_kept_set_is_the_outliers_and_preset_is_counts_only():
    keys = torch.zeros(1, 1, 10, 2)
    keys[0, 0, :, 0] = torch.tensor([0.1, -0.1, 0.2, -0.2, 0.0, 0.1, -0.1, 0.0, 0.05, -0.05])
    keys[0, 0, 3] = torch.tensor([3.0, 0.0])  # far along channel 0
    keys[0, 0, 7] = torch.tensor([0.0, -2.0])  # alone along channel 1
    method = methods.load("leverage", sketch_dimension=None)
    _, kept = method.plan([method.scorer.score(inputs(keys))], 0.2)
    assert kept[0].tolist() == [[3, 7]]
    kv = methods.load("leverage", preset="kvpress")
    assert (kv.scorer.sketch_dimension, kv.scorer.ridge, kv.budget_rule) == (48, 0.01, "kvpress")


def test_no_rotary_is_a_one_line_error():
    from harness.errors import KvbenchError

    with pytest.raises(KvbenchError, match="rotary"):
        methods.load("leverage").scorer.score(layer_inputs(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)))
