"""ThinK: channel scores and kept channels by hand, a cache that really stores fewer key channels and decodes as
if the pruned channels were zero, and the memory it reports (kvpress 0.5.5's ThinKPress keeps the same channels:
tests/test_conformance_think.py)."""
import pytest
import torch
from conftest import layer_inputs
from transformers import DynamicCache

import methods
from harness.cache import ChannelLayer, cache_bytes, kept_per_head, prune
from harness.compress import KeyChannels
from methods.think import channel_scores, kept_channels


def test_channel_scores_and_the_kept_channels_by_hand():
    # one KV head, two query heads (g = 2), head_dim 4, window 2 of 3 queries
    q = torch.tensor([[[[9.0, 9, 9, 9], [1, 2, 0, 1], [1, 0, 2, 1]],
                       [[9.0, 9, 9, 9], [3, 0, 0, 1], [1, 2, 0, 1]]]])
    k = torch.tensor([[[[2.0, 1, 1, 0], [0, 1, 3, 2]]]])
    # mean over the window of q^2: head 0 (1, 2, 2, 1), head 1 (5, 2, 0, 1); group mean (3, 2, 1, 1)
    # mean over keys of k^2: (2, 1, 5, 2) -> scores (6, 2, 5, 2)
    assert channel_scores(q, k, 2)[0, 0].tolist() == [6.0, 2.0, 5.0, 2.0]
    method = methods.load("think", "scorer.window=2")
    assert method.scorer.score(layer_inputs(q, k)) is None  # no token is evicted
    cuts = method.key_channels(0.5)
    assert cuts[0].channels.tolist() == [[0, 2]] and cuts[0].n_full == 32
    assert method.key_channels(1.0) == [None]  # every channel: the layer stays as it is


def test_kept_channel_counts_floor_and_kvpress():
    assert [kept_channels(16, r) for r in (0.25, 0.5, 0.75, 0.01)] == [4, 8, 12, 1]
    # kvpress: head_dim - int(head_dim * (1 - keep)), e.g. 128 at keep 0.6 prunes int(51.2) = 51 and keeps 77
    assert kept_channels(128, 0.6) == 76 and kept_channels(128, 0.6, "kvpress") == 77
    assert methods.load("think", "preset=kvpress").scorer.recent == 0


def _cache(keys, values):
    from harness.cache import _dense_layer

    cache = DynamicCache()
    cache.layers = [_dense_layer(keys, values)]
    return cache


def test_the_cache_stores_fewer_key_channels_and_decodes_as_zeroed_keys():
    from harness.attention import channel_attention, ragged_attention
    from harness.cache import RaggedKV

    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 10, 8, generator=gen), torch.randn(1, 2, 10, 8, generator=gen)
    channels = torch.tensor([[0, 3, 5], [1, 2, 7]])
    pruned = prune(_cache(keys, values), [None], channels=[KeyChannels(channels, n_full=4)])
    layer = pruned.layers[0]
    assert isinstance(layer, ChannelLayer) and layer.pruned.shape == (1, 2, 6, 3) and layer.full_keys.shape == (1, 2, 4, 8)
    assert cache_bytes(pruned) == 4 * (2 * 6 * 3 + 2 * 4 * 8 + 2 * 10 * 8) and kept_per_head(pruned) == [[10, 10]]
    # the reference: the same keys with the pruned channels zeroed on the first 6 entries
    zeroed = keys.clone()
    for h in range(2):
        drop = [c for c in range(8) if c not in channels[h].tolist()]
        zeroed[0, h, :6, drop] = 0.0
    new_k, new_v = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, 3, 8, generator=gen)
    k_arg, v_arg = layer.update(new_k, new_v)
    full_k, full_v = torch.cat([zeroed, new_k], 2), torch.cat([values, new_v], 2)
    for q_len in (1, 3):  # one decoded token; a multi-token step (the question) under the bottom-right mask
        q = torch.randn(1, 4, q_len, 8, generator=gen)
        ours = channel_attention(q, k_arg, v_arg, 0.3)
        ref = ragged_attention(q, RaggedKV([full_k[:, h : h + 1] for h in range(2)]),
                               RaggedKV([full_v[:, h : h + 1] for h in range(2)]), 0.3)
        assert torch.allclose(ours, ref, atol=1e-5)
    assert pruned.get_seq_length() == 13 and keys.shape == (1, 2, 10, 8)  # the source cache is untouched


def test_a_run_reports_the_memory_the_narrower_keys_take(tiny_llama):
    from harness.attention import install
    from harness.pipeline import run_sample

    model, tok = tiny_llama
    method = methods.load("think")
    ids = tok("a long enough context " * 8).input_ids
    with install(model) as hooks:
        outs = run_sample(model, tok, hooks, method, ids, tok(" q").input_ids, [0.25, 1.0], False, 3, [], 0)
    t = len(ids)
    quarter, full = outs
    # keys: (T - 32) entries x 4 of 16 channels + 32 whole; values whole: (1 + 1/4) / 2 + (3/4) * 32 / (2 T)
    assert quarter.kv_bytes / quarter.kv_bytes_full == pytest.approx((1 + 0.25) / 2 + 0.75 * 32 / (2 * t), abs=1e-9)
    assert quarter.kept_tokens == t and full.kv_bytes == full.kv_bytes_full


def test_keep_ratio_one_decodes_the_full_model_s_tokens(tiny_llama):
    from harness.attention import install
    from harness.pipeline import run_sample

    model, tok = tiny_llama
    ids = tok("some context for decoding " * 6).input_ids
    q = tok(" and a question").input_ids
    with install(model) as hooks:
        full = run_sample(model, tok, hooks, methods.load("full"), ids, q, [1.0], False, 6, [], 0)[0]
        same = run_sample(model, tok, hooks, methods.load("think"), ids, q, [1.0], False, 6, [], 0)[0]
        # every channel but one of 16: the decode runs through the channel attention and still follows the model
        near = run_sample(model, tok, hooks, methods.load("think"), ids, q, [15 / 16], False, 6, [], 0)[0]
    assert same.prediction == full.prediction and same.kv_bytes == full.kv_bytes
    assert near.kv_bytes < full.kv_bytes and isinstance(near.prediction, str)


def test_bad_values_are_one_line(capsys, tmp_path):
    from conftest import refused_in_process

    for arg in ("method.scorer.window=0", "method.scorer.recent=-1", "method.scorer.recent=many"):
        line = refused_in_process(capsys, "method=think", arg, "model=tiny-random", "n_samples=1",
                                  f"hydra.run.dir={tmp_path / 'r'}")
        assert arg.split("=")[0] in line and not (tmp_path / "r").exists()
