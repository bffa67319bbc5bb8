"""Compression while decoding (harness/decoding.py): kept entries on hand-made caches, the schedule and bound on a
real model, online H2O against a full forward, the footprint fields, and every refusal."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import methods
from conftest import refused_in_process
from harness.attention import install
from harness.cache import RaggedLayer, _dense_layer, kept_per_head, rotate_by
from harness.compress import DecodingPlan
from harness.decoding import DecodeCompressor, footprint_point, mean_footprint
from harness.models import build_tiny
from harness.pipeline import prefill, run_sample

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(name: str, plan: DecodingPlan, *overrides: str):
    return methods.build_method(methods.config(name, *overrides), plan)


class _Module(torch.nn.Module):
    def __init__(self, layer_idx: int, dim: int):
        super().__init__()
        self.layer_idx, self.scaling = layer_idx, dim ** -0.5


def positional_cache(n_layers: int, n_heads: int, n_tokens: int, dim: int = 8, seed: int = 0) -> DynamicCache:
    """A dense cache whose key channel 0 holds each entry's position (so what a cut kept can be read back)."""
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    layers = []
    for _ in range(n_layers):
        keys = torch.randn(1, n_heads, n_tokens, dim, generator=gen)
        keys[..., 0] = torch.arange(n_tokens, dtype=torch.float32)
        layers.append(_dense_layer(keys, torch.randn(1, n_heads, n_tokens, dim, generator=gen)))
    cache.layers = layers
    return cache


def positions_of(cache) -> list[list[list[int]]]:
    out = []
    for layer in cache.layers:
        heads = layer.head_keys if isinstance(layer, RaggedLayer) else list(layer.keys.split(1, dim=1))
        out.append([h[0, 0, :, 0].round().long().tolist() for h in heads])
    return out


def compressor_on(cache, method, target, interval, n_layers=2, dim=8, n_q_heads=4, seed=0, **plan):
    plan = DecodingPlan(mode="decode", target_size=target, compression_interval=interval, **plan)
    modules = [_Module(i, dim) for i in range(n_layers)]
    comp = DecodeCompressor(method, plan, target, modules, cache, seed)
    comp.begin()  # as harness.pipeline.decode does before the first step
    return comp


def step(comp: DecodeCompressor, cache, position: int, n_q_heads: int = 4, dim: int = 8, seed: int = 1):
    """One decoding step by hand: a new entry at ``position`` appended to every layer, its query captured."""
    gen = torch.Generator().manual_seed(seed + position)
    for layer_idx, layer in enumerate(cache.layers):
        key = torch.randn(1, layer.keys.shape[1], 1, dim, generator=gen)
        key[..., 0] = float(position)
        layer.keys = torch.cat([layer.keys, key], dim=2)
        layer.values = torch.cat([layer.values, torch.randn(1, layer.keys.shape[1], 1, dim, generator=gen)], dim=2)
        comp.capture(layer_idx, torch.randn(1, n_q_heads, 1, dim, generator=gen), layer.keys, None)
    comp.after_step(position, 1)


def test_streaming_llm_cut_keeps_sinks_and_the_most_recent_entries():
    cache = positional_cache(2, 2, 20)
    m = build("streaming_llm", DecodingPlan(mode="decode", target_size=10, compression_interval=4))
    comp = compressor_on(cache, m, 10, 4)
    for pos in range(20, 24):
        step(comp, cache, pos)
    # 24 entries at the 4th step: the 4 sinks and the 6 latest, in position order, in every layer and head
    want = [0, 1, 2, 3, 18, 19, 20, 21, 22, 23]
    assert positions_of(cache) == [[want, want], [want, want]]
    points = comp.finish()
    assert [(p["generated"], p["entries_max"]) for p in points] == [(0, 20), (4, 24), (4, 10)]
    for pos in range(24, 27):  # 3 more steps: below the interval, no cut
        step(comp, cache, pos)
    assert kept_per_head(cache) == [[13, 13], [13, 13]]


def test_knorm_cut_keeps_the_smallest_key_norms_by_hand():
    cache = positional_cache(1, 2, 12, seed=3)
    m = build("knorm", DecodingPlan(mode="decode", target_size=6, compression_interval=2), "selector.n_recent=1")
    comp = compressor_on(cache, m, 6, 2, n_layers=1)
    step(comp, cache, 12)
    keys = cache.layers[0].keys.clone()
    step(comp, cache, 13)
    got = positions_of(cache)[0]
    # by hand: per head, the most recent entry (13) and the 5 smallest norms among positions 0..12
    norms = keys[0].norm(dim=-1)  # [H, 13] before the last step
    for h in range(2):
        chosen = sorted(norms[h].argsort()[:5].tolist())
        assert got[h] == sorted(chosen + [13])


def test_no_cut_below_the_target_and_the_buffer_is_cleared_at_each_trigger():
    cache = positional_cache(1, 1, 5)
    m = build("snapkv", DecodingPlan(mode="decode", target_size=40, compression_interval=3), "scorer.window=2",
              "selector.n_recent=2")
    comp = compressor_on(cache, m, 40, 3, n_layers=1)
    for pos in range(5, 8):
        step(comp, cache, pos)
    assert comp.compressions == 0 and comp.steps == 0 and comp.queries == {}  # triggered, nothing to cut
    assert kept_per_head(cache) == [[8]]


def test_query_buffer_keeps_the_latest_queries_only():
    cache = positional_cache(1, 1, 5)
    m = build("snapkv", DecodingPlan(mode="decode", target_size=40, compression_interval=50, query_buffer=3),
              "scorer.window=2", "selector.n_recent=2")
    comp = compressor_on(cache, m, 40, 50, n_layers=1, query_buffer=3)
    for pos in range(5, 10):
        step(comp, cache, pos)
    assert comp.positions == [7, 8, 9] and comp.queries[0][0].shape[2] == 3


def test_ragged_layers_are_cut_per_head_to_the_target():
    cache = positional_cache(1, 2, 16)
    layer = cache.layers[0]
    cache.layers[0] = RaggedLayer([layer.keys[:, :1], layer.keys[:, 1:, :9]], [layer.values[:, :1], layer.values[:, 1:, :9]])
    m = build("streaming_llm", DecodingPlan(mode="decode", target_size=8, compression_interval=1))
    comp = compressor_on(cache, m, 8, 1, n_layers=1)
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(1, 2, 1, 8, generator=gen)
    key[..., 0] = 16.0
    cache.layers[0].update(key, torch.randn(1, 2, 1, 8, generator=gen))
    comp.capture(0, torch.randn(1, 4, 1, 8, generator=gen), None, None)
    comp.after_step(16, 1)
    # head 0 held 17 entries (0..16), head 1 held 10 (0..8, then 16): both cut to sinks + the latest 4
    assert positions_of(cache)[0] == [[0, 1, 2, 3, 13, 14, 15, 16], [0, 1, 2, 3, 6, 7, 8, 16]]
    assert not isinstance(cache.layers[0], RaggedLayer)  # equal counts again: dense


def test_mean_footprint_is_the_mean_over_decoding_steps_by_hand():
    points = [{"generated": 0, "entries_mean": 100.0}, {"generated": 64, "entries_mean": 164.0},
              {"generated": 64, "entries_mean": 100.0}, {"generated": 100, "entries_mean": 136.0}]
    # 64 steps averaging 132, then 36 steps averaging 118
    assert mean_footprint(points) == pytest.approx((64 * 132 + 36 * 118) / 100)
    assert mean_footprint([{"generated": 0, "entries_mean": 7.0}]) == 7.0
    assert mean_footprint([]) == 0.0


def test_rotate_by_moves_a_query_to_another_position():
    model, _ = build_tiny("llama")
    rotary = model.model.rotary_emb
    x = torch.randn(1, 2, 3, model.config.head_dim)
    pos = torch.tensor([[4, 9, 30]])
    cos, sin = rotary(x, pos)

    def rope(v, c, s):
        half = v.shape[-1] // 2
        rot = torch.cat((-v[..., half:], v[..., :half]), dim=-1)
        return v * c[:, None] + rot * s[:, None]

    at_pos = rope(x, cos, sin)
    cos2, sin2 = rotary(x, torch.tensor([[40, 40, 40]]))
    want = rope(x, cos2, sin2)
    got = rotate_by(at_pos, torch.tensor([36.0, 31.0, 10.0]), rotary.inv_freq)
    assert torch.allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# On a real (tiny random) model

CTX = torch.randint(3, 250, (1, 120), generator=torch.Generator().manual_seed(1))[0].tolist()
QUESTION = torch.randint(3, 250, (1, 5), generator=torch.Generator().manual_seed(2))[0].tolist()


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("llama")
    model.generation_config.eos_token_id = None
    tok.eos_token_id = None
    return model, tok


def outcome(tiny, method, ratio=0.5, n=48):
    model, tok = tiny
    with install(model) as hooks:
        return run_sample(model, tok, hooks, method, CTX, QUESTION, [ratio], False, n, [], seed=0)[0]


@pytest.mark.parametrize("name", ["snapkv", "knorm", "streaming_llm", "h2o", "tova"])
def test_cache_stays_within_target_plus_interval(tiny, name):
    target, interval = 40, 8
    got = outcome(tiny, build(name, DecodingPlan(mode="both", target_size=target, compression_interval=interval),
                              *(["selector.n_recent=8", "scorer.window=8"] if name == "snapkv" else [])))
    points = got.footprint["kv_footprint"]
    # the prefill cut to the target, the 5-token question, then a cut every 8 entries written
    assert points[0] == {**points[0], "generated": 0, "entries_max": target + len(QUESTION)}
    assert max(p["entries_max"] for p in points) <= target + interval
    afters = points[2:-1:2]
    assert all(p["entries_max"] == target for p in afters)
    # 48 tokens = 47 fed back after the question step: writes 5 + 47 = 52; cuts at 8, 16, .., 48 written
    assert got.footprint["generated_tokens"] == 48 and points[-1]["generated"] == 47
    assert len(points) == 2 + 2 * 6
    assert got.footprint["kv_mean_entries"] == pytest.approx(mean_footprint(points))


def test_a_target_never_reached_changes_nothing(tiny):
    plain = outcome(tiny, build("snapkv", DecodingPlan()))
    decoded = outcome(tiny, build("snapkv", DecodingPlan(mode="both", target_size=10_000, compression_interval=4)))
    assert decoded.prediction == plain.prediction and decoded.kept_tokens == plain.kept_tokens
    assert len(decoded.footprint["kv_footprint"]) == 2 == len(plain.footprint["kv_footprint"])


def test_decode_mode_keeps_the_prefill_whole_then_cuts(tiny):
    got = outcome(tiny, build("knorm", DecodingPlan(mode="decode", target_size=32, compression_interval=16)))
    points = got.footprint["kv_footprint"]
    assert got.kept_tokens == len(CTX)
    assert points[0]["entries_max"] == len(CTX) + len(QUESTION)
    assert points[1]["entries_max"] == len(CTX) + 16 and points[2]["entries_max"] == 32  # 5 + 11 written


def test_null_target_is_the_keep_ratios_budget(tiny):
    got = outcome(tiny, build("knorm", DecodingPlan(mode="both", compression_interval=8)), ratio=0.25)
    assert {p["entries_max"] for p in got.footprint["kv_footprint"][2:-1:2]} == {30}  # floor(120 * 0.25)


def test_prefill_mode_rows_record_a_growing_footprint(tiny):
    got = outcome(tiny, build("knorm", DecodingPlan()), ratio=0.25)
    start, end = got.footprint["kv_footprint"]
    assert (start["entries_max"], end["entries_max"], end["generated"]) == (30 + 5, 30 + 5 + 47, 47)


def test_online_h2o_sums_equal_a_full_forwards_column_sums(tiny):
    """No cut (target above everything): the accumulated attention of every entry after the generation equals
    the column sums of one forward over the prompt, the question and the fed tokens."""
    model, tok = tiny
    m = build("h2o", DecodingPlan(mode="decode", target_size=10_000, compression_interval=4))
    with install(model) as hooks:
        run_sample(model, tok, hooks, m, CTX, QUESTION, [0.5], False, 12, [], seed=0)
    online = {layer: torch.stack(h) for layer, h in m.scorer._sums.items()}
    n_entries = online[0].shape[1]
    # the ids the cache holds: context, question, and the 11 generated tokens fed back (the last is not fed)
    model_tokens = run_tokens(tiny, m)
    ids = CTX + QUESTION + model_tokens[:-1]
    assert len(ids) == n_entries
    reference = build("h2o", DecodingPlan())
    with install(model) as hooks:
        full = prefill(model, hooks, ids, reference, seed=0)
    for layer, sums in online.items():
        assert torch.allclose(sums, full.scores[layer][0], atol=1e-4), layer


def run_tokens(tiny, method) -> list[int]:
    from harness.pipeline import decode

    model, tok = tiny
    with install(model) as hooks:
        pre = prefill(model, hooks, CTX, build("h2o", DecodingPlan()), seed=0)
        return decode(model, pre.cache, QUESTION, pre.last_logits, len(CTX), 12, tok, []).token_ids


def test_online_h2o_cuts_its_sums_with_the_cache(tiny):
    m = build("h2o", DecodingPlan(mode="both", target_size=30, compression_interval=8))
    got = outcome(tiny, m, n=22)
    end = got.footprint["kv_footprint"][-1]["entries_max"]
    assert end == 32  # the question (5) and 3 tokens: a cut; 8 more: a cut, twice; then 2 tokens
    for layer, heads in m.scorer._sums.items():
        assert [s.shape[0] for s in heads] == [end] * len(heads), layer


def test_adakv_prefill_then_uniform_decode_cuts(tiny):
    got = outcome(tiny, build("snapkv_adakv", DecodingPlan(mode="both", target_size=30, compression_interval=8),
                              "scorer.window=8", "selector.n_recent=8"))
    points = got.footprint["kv_footprint"]
    assert points[0]["entries_mean"] == pytest.approx(30 + len(QUESTION))  # the mean is the budget
    # the decode cut caps every head at the target; the heads AdaKV gave less keep what they hold
    assert points[2]["entries_max"] == 30 and points[2]["entries_mean"] < 30


# --------------------------------------------------------------------------------------------------------------
# Refusals (one line, exit 2, before anything is written)

BASE = ("method=snapkv", "model=tiny-random", "n_samples=1", "context_length=128")


@pytest.mark.parametrize("args, words", [
    (("decoding.target_size=0",), "decoding.target_size"),
    (("decoding.target_size=abc",), "decoding.target_size"),
    (("decoding.compression_interval=-1",), "decoding.compression_interval"),
    (("decoding.query_buffer=0",), "decoding.query_buffer"),
    (("decoding.mode=sometimes",), "decoding.mode"),
    (("decoding.query_positions=first",), "decoding.query_positions"),
    (("decoding.mode=prefill", "decoding.target_size=64"), "decoding.mode=prefill"),
    (("decoding.target_size=16",), "above the 32 entries"),
    (("method=full", "decoding.mode=decode"), "keeps everything"),
    (("method=kvzip", "decoding.mode=both"), "scorer kvzip"),
    (("method=think", "decoding.mode=both"), "scorer think"),
    (("method=asl", "decoding.mode=both"), "scorer asl"),
    (("method=kvzap", "decoding.mode=both"), "hidden state"),
    (("decoding.mode=decode", "method.prefill_chunk=32"), "method.prefill_chunk"),
    (("method=spkv", "model=reference", "decoding.mode=decode"), "method.allocator=spkv"),
    (("method=spkv", "model=reference", "method.allocator=uniform", "decoding.target_size=80"), "decoding.mode=both"),
    (("method.scorer=composed", "decoding.mode=both"), "scorer composed"),
])
def test_bad_decoding_settings_are_refused_in_one_line(capsys, tmp_path, args, words):
    line = refused_in_process(capsys, *BASE, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert words in line
    assert not (tmp_path / "run").exists()


def test_every_method_config_decodes_or_is_refused(tmp_path):
    """Each method config either compresses while decoding (its after-cut points hold the target on average) or
    is refused up front; none fails a row."""
    from harness.errors import KvbenchError
    from harness.io import read_rows
    from harness.runner import run
    from test_every_config import compose

    refused, ran = [], []
    for name in methods.config_names():
        cfg = compose(f"method={name}", "model=reference", "task=ruler/niah_single_1", "context_length=256",
                      "n_samples=1", "keep_ratio=[0.25]", "max_new_tokens=14", "progress=false",
                      "decoding.target_size=40", "decoding.compression_interval=6")
        try:
            run(cfg, tmp_path / name)
        except KvbenchError as err:
            assert "decoding" in str(err) or "checkpoint" in str(err), (name, str(err))
            refused.append(name)
            continue
        (row,) = read_rows(tmp_path / name / "predictions.jsonl")[0]
        assert row["error"] is None, (name, row["error"])
        cuts = [p for a, p in zip(row["kv_footprint"], row["kv_footprint"][1:]) if a["generated"] == p["generated"]
                and p["entries_mean"] < a["entries_mean"]]
        if row["generated_tokens"] >= 6:
            assert cuts and all(math.isclose(p["entries_mean"], 40) for p in cuts), name
        ran.append(name)
    assert {"snapkv", "h2o", "knorm", "streaming_llm", "tova", "expected_attention"} <= set(ran)
    assert {"full", "kvzip", "think", "asl", "gemfilter"} <= set(refused)


def test_spkv_gated_layer_is_cut_with_its_gates_and_positions():
    from methods.spkv import GatedLayer

    keys = [torch.arange(6, dtype=torch.float32).reshape(1, 1, 6, 1).expand(1, 1, 6, 2).clone()]
    values = [k.clone() for k in keys]
    positions = [torch.tensor([0, 3, 5, 8, 9, 10])]
    gates = [torch.tensor([0.9, 0.2, 0.5, 0.3, 0.05, 0.4])]
    layer = GatedLayer(keys, values, positions, gates, next_pos=11, window=3, threshold=0.1, gate_fn=None)
    # the next query (11) sees positions 9 and 10 inside its window: +inf; the others rank by gate
    assert layer.decode_scores(0).tolist() == pytest.approx([0.9, 0.2, 0.5, 0.3, math.inf, math.inf])
    layer.keep([torch.tensor([0, 2, 4, 5])])
    assert layer.positions[0].tolist() == [0, 5, 9, 10] and layer.gates[0].tolist() == pytest.approx([0.9, 0.5, 0.05, 0.4])
    assert layer.head_keys[0][0, 0, :, 0].tolist() == [0, 2, 4, 5] and layer.lengths == [4]


def test_spkv_compresses_while_decoding_by_its_gates(tmp_path):
    from harness.io import read_rows
    from harness.runner import run
    from test_every_config import compose

    cfg = compose("method=spkv", "model=reference", "task=ruler/niah_single_1", "context_length=512", "n_samples=1",
                  "max_new_tokens=40", "progress=false", "decoding.target_size=80", "decoding.compression_interval=16")
    run(cfg, tmp_path)
    (row,) = read_rows(tmp_path / "predictions.jsonl")[0]
    points = row["kv_footprint"]
    cuts = [b for a, b in zip(points, points[1:]) if a["generated"] == b["generated"] and b["entries_max"] < a["entries_max"]]
    assert row["error"] is None and cuts and all(p["entries_max"] == 80 for p in cuts)
    assert max(p["entries_max"] for p in points[2:]) <= 80 + 16


def test_library_method_takes_the_decoding_keys(tiny):
    import kvbench
    from harness.errors import KvbenchError

    model, tok = tiny
    m = kvbench.method("knorm", keep_ratio=0.25, decoding={"target_size": 20, "compression_interval": 8})
    assert (m.decoding.mode, m.decoding.target_size, m.decoding.compression_interval) == ("both", 20, 8)
    _, stats = kvbench.generate(model, tok, CTX, QUESTION, m, max_new_tokens=30, return_stats=True)
    assert stats["decoding"] == "both" and stats["generated_tokens"] == 30
    assert max(p["entries_max"] for p in stats["kv_footprint"][2:]) <= 20 + 8
    for bad, words in [({"target_size": 0}, "decoding.target_size=0"), ({"modes": "both"}, "decoding.modes"),
                       ({"mode": "prefill", "target_size": 9}, "decoding.mode=prefill"), (256, "decoding=256"),
                       ("both", "decoding='both'")]:
        with pytest.raises(KvbenchError, match=words):
            kvbench.method("knorm", decoding=bad)
    with pytest.raises(KvbenchError, match="compresses while decoding"):
        with kvbench.compress(model, m):
            pass


def test_one_token_question_is_not_a_generated_token(tiny):
    model, tok = tiny
    m = build("knorm", DecodingPlan(mode="both", target_size=30, compression_interval=8))
    with install(model) as hooks:
        got = run_sample(model, tok, hooks, m, CTX, QUESTION[:1], [0.5], False, 30, [], seed=0)[0]
    assert got.footprint["generated_tokens"] == 30 and got.footprint["kv_footprint"][-1]["generated"] == 29


@pytest.mark.parametrize("name, extra", [("criticalkv", ()), ("simlayerkv", ("scorer.recent=40",)),
                                         ("critical_adakv", ())])
def test_a_shared_prefill_cuts_each_ratio_as_a_run_of_that_ratio_alone(tiny, name, extra):
    """Decoding rescoring the cache must not change what the next ratio's cut reads from the prefill."""
    model, tok = tiny
    plan = DecodingPlan(mode="both", target_size=48, compression_interval=6)
    with install(model) as hooks:
        swept = run_sample(model, tok, hooks, build(name, plan, *extra), CTX, QUESTION, [0.25, 0.5], False, 16, [],
                           seed=0)
        alone = run_sample(model, tok, hooks, build(name, plan, *extra), CTX, QUESTION, [0.5], False, 16, [], seed=0)
    assert (swept[1].prediction, swept[1].budgets, swept[1].footprint["kv_footprint"]) == (
        alone[0].prediction, alone[0].budgets, alone[0].footprint["kv_footprint"])


def test_criticalkv_norms_of_one_ragged_head_are_that_heads():
    from methods.criticalkv import output_norms

    model, _ = build_tiny("llama")
    module = model.model.layers[0].self_attn
    values = torch.randn(1, model.config.num_key_value_heads, 10, model.config.head_dim)
    whole = output_norms(values, module)
    for h in range(values.shape[1]):
        assert torch.allclose(output_norms(values[:, h:h + 1], module, kv_head=h)[0, 0], whole[0, h], atol=1e-5)


def test_h2o_after_a_chunked_prefill_starts_from_zero(tiny):
    got = outcome(tiny, build("h2o", DecodingPlan(mode="both", target_size=30, compression_interval=8),
                              "prefill_chunk=32"))
    assert max(p["entries_max"] for p in got.footprint["kv_footprint"][1:]) <= 30 + 8


def test_resume_treats_a_spelled_out_default_mode_as_the_default(tmp_path):
    from harness.runner import run
    from test_every_config import compose

    base = ("method=knorm", "model=tiny-random", "n_samples=1", "context_length=512", "max_new_tokens=3",
            "progress=false")
    run(compose(*base), tmp_path)
    run(compose(*base, "decoding.mode=prefill"), tmp_path)  # the same run: resumes, not refused
    run(compose(*base, "decoding.target_size=40"), tmp_path / "b")
    run(compose(*base, "decoding.mode=both", "decoding.target_size=40"), tmp_path / "b")
