"""Method options that change how the cache is built or stored, for any scorer: ``method.prefill_chunk`` (the prompt
prefilled a chunk at a time, the cache compressed back to the budget after each chunk) and
``method.rerotate_keys`` (kept keys rotated to positions 0 .. n - 1). kvpress conformance of both:
tests/test_conformance_extra.py (groups block and key_rerotation)."""
import pytest
import torch

import methods
from harness.errors import KvbenchError


def _ids(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (n,), generator=gen).tolist()


@pytest.mark.parametrize("name", ["knorm", "snapkv", "h2o", "tova", "expected_attention", "streaming_llm", "keydiff"])
def test_chunked_prefill_never_holds_more_than_budget_plus_chunk(tiny_llama, name):
    from harness.attention import install
    from harness.compat import CACHE_ARG
    from harness.compress import n_keep
    from harness.pipeline import chunked_prefill

    cache_of = lambda kwargs: kwargs[CACHE_ARG]  # noqa: E731

    model, _ = tiny_llama
    method = methods.load(name, prefill_chunk=16)
    ids = _ids(150)
    budget = n_keep(len(ids), 0.3)
    held: list[int] = []  # cache entries per head before each forward
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: held.append(cache_of(kwargs).get_seq_length()), with_kwargs=True)
    try:
        with install(model) as hooks:
            done = chunked_prefill(model, hooks, ids, method, 0, 0.3)
    finally:
        hook.remove()
    # first the budget's worth of tokens, then chunks of 16 onto a cache cut back to the budget each time
    assert held == [0] + [budget] * len(range(budget, len(ids), 16))
    assert max(held) + 16 <= budget + 16
    for layer, positions in zip(done.prefill.cache.layers, done.kept):
        assert layer.keys.shape[2] == budget and positions.shape == (layer.keys.shape[1], budget)
        for row in positions:
            assert row.unique().numel() == budget and int(row.max()) < len(ids)
    assert done.budgets.unique().tolist() == [budget]
    if name == "streaming_llm":  # sinks + the most recent tokens, whatever the chunks
        want = list(range(4)) + list(range(len(ids) - (budget - 4), len(ids)))
        assert sorted(done.kept[0][0].tolist()) == want


def test_chunked_prefill_keeps_the_first_tokens_when_the_budget_is_the_prompt(tiny_llama):
    from harness.attention import install
    from harness.pipeline import chunked_prefill

    model, _ = tiny_llama
    method = methods.load("knorm", prefill_chunk=8)
    with install(model) as hooks:
        done = chunked_prefill(model, hooks, _ids(40), method, 0, 1.0)
    assert [p.shape[-1] for p in done.kept] == [40] * len(done.kept)
    assert done.kept[0][0].tolist() == list(range(40))


def test_chunked_prefill_answers_through_the_command_path(tiny_llama):
    """run_sample with prefill_chunk: one prefill per ratio, kv_bytes at the budget, a prediction."""
    from harness.attention import install
    from harness.pipeline import run_sample

    model, tokenizer = tiny_llama
    method = methods.load("knorm", prefill_chunk=16)
    with install(model) as hooks:
        outs = run_sample(model, tokenizer, hooks, method, _ids(120), _ids(5, 1), [0.25, 0.5], False, 4, [], seed=0)
    assert [o.kept_tokens for o in outs] == [30, 60]
    for o in outs:
        assert o.kv_bytes / o.kv_bytes_full == pytest.approx(o.keep_ratio)
        assert o.extras["prefill_chunk"] == 16 and o.prefill_s > 0


@pytest.mark.parametrize("name,values,needle", [
    ("snapkv", {"allocator": "adakv", "prefill_chunk": 32}, "budgets per head"),
    ("pyramidkv", {"prefill_chunk": 32}, "budgets per layer"),
    ("asl", {"prefill_chunk": 32}, "changes the prefill itself"),
    ("kvzip", {"prefill_chunk": 32, "allocator": "uniform"}, "whole prefill at once"),
    ("think", {"prefill_chunk": 32}, "whole prefill at once"),
    ("pyramidkv", {"rerotate_keys": True}, "one kept count"),
    ("snapkv", {"allocator": "adakv", "rerotate_keys": True}, "one kept count"),
])
def test_options_a_composition_cannot_honour_are_one_line_errors(name, values, needle):
    with pytest.raises(KvbenchError, match=needle) as err:
        methods.load(name, **values)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [0, -4, 2.5, "many", True])
def test_prefill_chunk_must_be_a_positive_count(bad):
    with pytest.raises(KvbenchError, match="prefill_chunk"):
        methods.load("knorm", prefill_chunk=bad)


def test_rerotated_keys_equal_keys_rotated_at_their_new_positions(tiny_llama):
    """harness.cache.rerotate moves a key from position p to j: equal to the pre-RoPE key rotated at j by the
    model's own rotary embedding (transformers' apply_rotary_pos_emb)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from harness.cache import _dense_layer, rerotate
    from transformers import DynamicCache

    model, _ = tiny_llama
    rotary = model.model.rotary_emb
    gen = torch.Generator().manual_seed(0)
    n_heads, dim, n_tokens = 2, model.config.head_dim, 12
    raw = torch.randn(1, n_heads, n_tokens, dim, generator=gen)
    cos, sin = rotary(raw, torch.arange(n_tokens)[None])
    rotated, _ = apply_rotary_pos_emb(raw, raw, cos, sin)
    kept = torch.tensor([[0, 3, 4, 9, 11], [1, 2, 5, 6, 10]])
    cache = DynamicCache()
    gather = kept[None, :, :, None].expand(1, -1, -1, dim)
    cache.layers = [_dense_layer(rotated.gather(2, gather), rotated.gather(2, gather))]
    assert rerotate(cache, [kept], rotary.inv_freq) == 5
    cos_new, sin_new = rotary(raw, torch.arange(5)[None])
    want, _ = apply_rotary_pos_emb(raw.gather(2, gather), raw.gather(2, gather), cos_new, sin_new)
    assert torch.allclose(cache.layers[0].keys, want, atol=1e-5)
    assert torch.equal(cache.layers[0].values, rotated.gather(2, gather))  # values never move


def test_rerotate_decodes_from_the_kept_count(tiny_llama, monkeypatch):
    import harness.pipeline as pipeline
    from harness.attention import install

    model, tokenizer = tiny_llama
    starts: list[int] = []
    decode = pipeline.decode
    monkeypatch.setattr(pipeline, "decode", lambda *a, **k: starts.append(a[4]) or decode(*a, **k))
    for rerotate in (False, True):
        method = methods.load("streaming_llm", rerotate_keys=rerotate)
        with install(model) as hooks:
            pipeline.run_sample(model, tokenizer, hooks, method, _ids(100), _ids(4, 1), [0.2], False, 2, [], seed=0)
    assert starts == [100, 20]


def test_a_chunk_shorter_than_the_window_observes_the_chunk(tiny_llama):
    """SnapKV with window 32 on 8-token chunks: the observation window is the chunk's 8 queries at their own
    positions (not 32 rows misplaced onto the mask), so the kept set equals SnapKV with window 8 on the same
    chunks outside the protected recent tokens."""
    from harness.attention import install
    from harness.pipeline import chunked_prefill

    model, _ = tiny_llama
    kept = {}
    for window in (32, 8):
        method = methods.load("snapkv", "selector.n_recent=8", prefill_chunk=8, window=window)
        with install(model) as hooks:
            kept[window] = chunked_prefill(model, hooks, _ids(100), method, 0, 0.4).kept
    for a, b in zip(kept[32], kept[8]):
        assert torch.equal(a.sort(dim=-1).values, b.sort(dim=-1).values)


def test_rerotate_keys_is_refused_for_a_pyramid_and_runs_on_fastkv_per_head_cuts(tmp_path):
    """PyramidInfer keeps another count in each layer (nothing to decode from): refused when the run is checked.
    FastKV with a TSP share above the budget caches per-head SnapKV picks among the propagated tokens ([H, n] cuts
    of the prefill): their keys re-rotate like any other."""
    import pytest

    from harness.errors import KvbenchError
    from harness.io import read_rows
    from harness.overrides import Composer
    from harness.runner import check_config, run
    from tests.test_every_config import CONF

    with Composer(CONF, "config") as composer:
        pyramid = composer.compose(["method=pyramidinfer", "method.rerotate_keys=true", "model=reference"])
    with pytest.raises(KvbenchError, match="different count per layer"):
        check_config(pyramid, model_files=False)
    with Composer(CONF, "config") as composer:
        cfg = composer.compose(["method=fastkv", "method.rerotate_keys=true", "method.scorer.tsp_ratio=0.5",
                                "model=reference", "task=ruler/niah_single_1", "context_length=1024", "n_samples=1",
                                "keep_ratio=0.25", "max_new_tokens=4", "progress=false"])
    run(cfg, tmp_path)
    (row,) = read_rows(tmp_path / "predictions.jsonl")[0]
    assert row["error"] is None and isinstance(row["prediction"], str)
