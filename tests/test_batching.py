"""Batched evaluation (``batch_size``) and one-call attention over heads of different lengths.

* ``ragged_attention`` (one masked call over left-padded heads) equals attention computed head by head, for one
  query and for a multi-token step, GQA groups, and a head with a visibility of its own (SP-KV's ``GatedKV``);
* ``BatchLayer`` stacks dense and ragged layers of different lengths, left-padded, and drops finished rows;
* ``decode_together`` gives each generation the tokens and footprint of decoding it alone;
* a run gives the same rows at every batch size (dense and ragged caches, several ratios, questions per context,
  methods decoded one at a time), resumes under another batch size, records a failing batch in its rows, and
  refuses bad batch sizes before anything is written.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from harness.attention import install, ragged_attention
from harness.batching import Job, decode_together
from harness.cache import BatchLayer, RaggedKV, RaggedLayer, bottom_right_causal, kept_per_head, prune
from harness.compat import cache_of, with_cache
from harness.overrides import Composer
from tests.conftest import refused_in_process

CONF = Path(__file__).resolve().parent.parent / "conf"
# what differs between batch sizes by design: timings, the batch's shared peak memory, the batch size itself
VOLATILE = {"prefill_s", "compress_s", "decode_s", "peak_mem_bytes", "decode_ms_per_token", "batch_size"}


def per_head_attention(query, keys: RaggedKV, values: RaggedKV, scaling):
    """Attention head by head (what ragged_attention computed before it became one call)."""
    group = query.shape[1] // len(keys.heads)
    outs = []
    for h, (k, v) in enumerate(zip(keys.heads, values.heads)):
        q = query[:, h * group:(h + 1) * group]
        logits = (q @ k.transpose(-1, -2)).float() * scaling
        mask = keys.head_mask(h, query.shape[2])
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        outs.append(logits.softmax(-1) @ v)
    return torch.cat(outs, dim=1).transpose(1, 2)


@dataclass
class OwnMask(RaggedKV):
    """A ragged layer with its own per-head visibility (as SP-KV's GatedKV)."""

    masks: list = field(default_factory=list)

    def head_mask(self, head, q_len):
        return self.masks[head][None, None]


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("lengths, group", [([5, 9], 2), ([7, 7, 3, 12], 1), ([1, 6, 2], 3)])
def test_ragged_attention_is_attention_head_by_head(q_len, lengths, group):
    gen = torch.Generator().manual_seed(len(lengths) * 10 + q_len)
    lengths = [max(n, q_len) for n in lengths]
    query = torch.randn(1, len(lengths) * group, q_len, 8, generator=gen)
    keys = RaggedKV([torch.randn(1, 1, n, 8, generator=gen) for n in lengths])
    values = RaggedKV([torch.randn(1, 1, n, 8, generator=gen) for n in lengths])
    got = ragged_attention(query, keys, values, 0.3)
    assert got.shape == (1, q_len, len(lengths) * group, 8)
    torch.testing.assert_close(got, per_head_attention(query, keys, values, 0.3), atol=1e-6, rtol=1e-5)


def test_ragged_attention_keeps_a_heads_own_visibility():
    gen = torch.Generator().manual_seed(3)
    lengths, q_len = [6, 4], 3
    masks = [bottom_right_causal(q_len, n, "cpu")[0, 0].clone() for n in lengths]
    masks[0][:, 1] = False  # head 0 hides its second entry from every query; head 1 its first from the last
    masks[1][2, 0] = False
    keys = OwnMask([torch.randn(1, 1, n, 8, generator=gen) for n in lengths], masks)
    values = RaggedKV([torch.randn(1, 1, n, 8, generator=gen) for n in lengths])
    query = torch.randn(1, 4, q_len, 8, generator=gen)
    got = ragged_attention(query, keys, values, 0.5)
    torch.testing.assert_close(got, per_head_attention(query, keys, values, 0.5), atol=1e-6, rtol=1e-5)
    # the hidden entry matters: without the override the output differs
    plain = ragged_attention(query, RaggedKV(keys.heads), values, 0.5)
    assert not torch.allclose(plain, got)


def test_batch_layer_pads_each_sample_and_head_on_the_left():
    dense = copy.deepcopy(_dense(torch.arange(2 * 3 * 2, dtype=torch.float32).view(1, 2, 3, 2)))
    ragged = RaggedLayer([torch.full((1, 1, 1, 2), 7.0), torch.full((1, 1, 5, 2), 8.0)],
                         [torch.full((1, 1, 1, 2), 7.0), torch.full((1, 1, 5, 2), 8.0)])
    layer = BatchLayer.stack([dense, ragged])
    assert layer.keys.shape == (2, 2, 5, 2)
    assert layer.pad.tolist() == [[2, 2], [4, 0]]
    assert torch.equal(layer.keys[0, :, 2:], dense.keys[0]) and (layer.keys[0, :, :2] == 0).all()
    assert (layer.keys[1, 0, 4:] == 7).all() and (layer.keys[1, 1] == 8).all()
    keys, _ = layer.update(torch.ones(2, 2, 1, 2), torch.ones(2, 2, 1, 2))
    assert keys.states.shape == (2, 2, 6, 2)
    mask = keys.mask(1)
    assert mask[:, :, 0].sum(-1).tolist() == [[4, 4], [2, 6]]  # each row sees its own entries and the new one
    layer.select(torch.tensor([0]))  # sample 1 ended: its rows go, and the columns padding in every row left
    assert layer.keys.shape == (1, 2, 4, 2) and layer.pad.tolist() == [[0, 0]]
    assert torch.equal(layer.keys[0, :, :3], dense.keys[0])


def _dense(keys):
    from harness.cache import _dense_layer

    return _dense_layer(keys, keys.clone())


@pytest.fixture(scope="module")
def llama():
    from harness.models import build_tiny

    model, tok = build_tiny("llama", seed=1)
    return model, tok


def _cut_cache(model, ids, kept_per_layer):
    out = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None],
                **with_cache(DynamicCache()), use_cache=True, logits_to_keep=1)
    return prune(cache_of(out), kept_per_layer), out.logits[:, -1]


@torch.no_grad()
def test_decode_together_gives_each_generation_its_own_tokens_and_footprint(llama):
    from harness.pipeline import decode
    from harness.decoding import DecodeCompressor
    from harness.compress import DecodingPlan
    import methods

    model, tok = llama
    method = methods.load("full")
    gen = torch.Generator().manual_seed(0)
    jobs, alone = [], []
    with install(model) as hooks:
        for j, (n, tail, max_new, ragged) in enumerate([(40, [5, 6, 7], 9, False), (23, [], 12, True),
                                                       (57, [9], 1, True), (31, [4, 4], 0, False),
                                                       (12, [], 15, False)]):
            ids = torch.randint(3, 250, (n,), generator=gen).tolist()
            kept = []
            for _ in range(2):  # 2 layers, 2 KV heads
                if ragged:
                    kept.append([torch.randperm(n, generator=gen)[:k].sort().values for k in (n // 3, n // 2)])
                else:
                    kept.append(torch.randperm(n, generator=gen)[: n // 2].sort().values.expand(2, -1))
            cache, logits = _cut_cache(model, ids, kept)
            start = n + 3 * j  # positions of their own, not the prompt's length
            stops = ["\x07"] if j == 0 else []
            jobs.append(Job(copy.deepcopy(cache), tail, logits, start, max_new, stops))
            compressor = DecodeCompressor(method, DecodingPlan(), 0, hooks.modules, cache, 0, hooks.rotary)
            alone.append(decode(model, cache, tail, logits, start, max_new, tok, stops, compressor))
        together = decode_together(model, tok, jobs)
    assert sum(len(g.token_ids) for g in alone) > 10  # they really generate, and end at different steps
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids and b.text == a.text
        assert {k: v for k, v in b.footprint.items() if k != "decode_ms_per_token"} == \
            {k: v for k, v in a.footprint.items() if k != "decode_ms_per_token"}
    assert [len(g.token_ids) for g in together][3] == 0 and len(together[2].token_ids) <= 1


def compose(*overrides):
    with Composer(CONF, "config") as composer:
        return composer.compose(list(overrides))


def _rows(directory):
    return [json.loads(line) for line in open(Path(directory) / "predictions.jsonl")]


def _same_rows(a, b):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in VOLATILE} == {k: v for k, v in y.items() if k not in VOLATILE}


@pytest.mark.parametrize("overrides", [
    ["method=snapkv", "keep_ratio=[0.25,0.5]"],
    ["method=snapkv_adakv", "keep_ratio=0.2"],  # ragged caches
    ["method=full", "query_aware=true"],
    ["method=snapkv", "keep_ratio=0.3", "decoding.target_size=48", "decoding.compression_interval=4"],  # alone
    ["method=think", "keep_ratio=0.5"],  # channel-pruned layers: decoded alone
])
def test_rows_are_the_same_at_every_batch_size(tmp_path, overrides):
    from harness.runner import run

    common = ["model=reference", "task=ruler/niah_single_1", "context_length=256", "n_samples=5",
              "max_new_tokens=8", "progress=false", *overrides]
    run(compose(*common, "batch_size=1"), tmp_path / "one")
    run(compose(*common, "batch_size=3"), tmp_path / "three")
    one, three = _rows(tmp_path / "one"), _rows(tmp_path / "three")
    _same_rows(one, three)
    assert {r["batch_size"] for r in three} == {3} and {r["batch_size"] for r in one} == {1}
    assert all(r["error"] is None for r in three)


def test_questions_per_context_batch_too(tmp_path):
    from harness.runner import run

    common = ["model=reference", "task=ruler/niah_multikey_1", "context_length=256", "n_samples=3",
              "questions_per_context=2", "max_new_tokens=6", "method=snapkv", "keep_ratio=0.4", "progress=false"]
    run(compose(*common), tmp_path / "one")
    run(compose(*common, "batch_size=4"), tmp_path / "four")
    _same_rows(_rows(tmp_path / "one"), _rows(tmp_path / "four"))


def test_a_run_resumes_under_another_batch_size(tmp_path):
    from harness.runner import run

    common = ["model=reference", "task=ruler/niah_single_1", "context_length=256", "max_new_tokens=6",
              "method=snapkv", "keep_ratio=0.3", "progress=false"]
    run(compose(*common, "n_samples=2", "batch_size=1"), tmp_path / "run")
    with pytest.raises(Exception):  # n_samples is part of the config; batch_size is not
        run(compose(*common, "n_samples=4", "batch_size=2"), tmp_path / "run")
    run(compose(*common, "n_samples=2", "batch_size=2"), tmp_path / "run")  # nothing left to do
    assert len(_rows(tmp_path / "run")) == 2


def test_a_failing_batch_fails_its_rows_not_the_run(tmp_path, monkeypatch):
    from harness import batching
    from harness.runner import run

    calls = []

    def broken(model, tokenizer, jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(model, tokenizer, jobs)

    real = batching.decode_together
    monkeypatch.setattr(batching, "decode_together", broken)
    run(compose("model=reference", "task=ruler/niah_single_1", "context_length=256", "n_samples=5",
                "max_new_tokens=4", "method=snapkv", "keep_ratio=0.3", "batch_size=2", "progress=false"),
        tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert calls == [2, 2, 1]
    assert [r["error"] is not None for r in rows] == [True, True, False, False, False]
    assert "simulated" in rows[0]["error"] and rows[0]["prediction"] is None


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "abc", "null"])
def test_bad_batch_sizes_are_refused(capsys, tmp_path, value):
    line = refused_in_process(capsys, "model=tiny-random", f"batch_size={value}", f"hydra.run.dir={tmp_path}/x")
    assert "batch_size" in line
    assert not (tmp_path / "x").exists()
