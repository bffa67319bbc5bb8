"""DuoAttention: budgets and kept sets by hand, the pattern files (official layout) and their checks, the gate
optimisation (kvpress 0.5.5's DuoAttentionPress with the same local pattern: tests/test_conformance_extra.py,
group duo_attention)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import methods
from harness.errors import KvbenchError
from methods.duo_attention import (_Gated, duo_budgets, load_pattern, passkey_prompts, profile, save_pattern,
                                   streaming_mask)

ROOT = Path(__file__).resolve().parent.parent
SCORES = torch.tensor([[0.9, 0.1], [0.5, 0.3]], dtype=torch.float64)


def test_memory_budgets_turn_the_lowest_heads_streaming_until_the_total_fits():
    # T = 100, windows 4 + 6 = 10; keep 0.5: total 4 * 50 = 200 of 400. Streaming order: (0,1) 0.1, (1,1) 0.3,
    # (1,0) 0.5: two full conversions (-90 each) leave 220, the third head gives up only 20 (keeps 80)
    assert duo_budgets(SCORES, [100, 100], 0.5, 4, 6).tolist() == [[100, 10], [80, 10]]
    # keep 0.75: one conversion (310) then 10 more from (1,1)
    assert duo_budgets(SCORES, [100, 100], 0.75, 4, 6).tolist() == [[100, 10], [100, 90]]
    # keep 0.05: 20 in all, less than the four windows (40): every head streams with half its window
    assert duo_budgets(SCORES, [100, 100], 0.05, 4, 6).tolist() == [[5, 5], [5, 5]]
    # windows longer than the context: nothing to cut but the windows themselves
    assert duo_budgets(SCORES, [8, 8], 0.5, 4, 6).sum() == 16


def test_head_budgets_are_kvpress_s_round_of_the_head_share():
    # kvpress: round(n_heads * compression_ratio) streaming heads (Python's round: 1.5 -> 2, 4.5 -> 4), windows fixed
    assert duo_budgets(SCORES, [100, 100], 0.75, 4, 6, "heads").tolist() == [[100, 10], [100, 100]]
    assert duo_budgets(SCORES, [100, 100], 0.5, 4, 6, "heads").tolist() == [[100, 10], [100, 10]]
    six = torch.tensor([[0.9, 0.15], [0.4, 0.72], [0.05, 0.6]], dtype=torch.float64)
    assert duo_budgets(six, [200] * 3, 0.75, 8, 32, "heads", "kvpress").tolist() == [[200, 40], [200, 200], [40, 200]]
    assert duo_budgets(six, [200] * 3, 0.25, 8, 32, "heads", "kvpress").tolist() == [[200, 40], [40, 200], [40, 40]]


def _pattern_dir(tmp_path, scores, sink=4, recent=6, **extra):
    path = save_pattern(tmp_path / "pat", torch.tensor(scores, dtype=torch.float64),
                        {"sink_size": sink, "recent_size": recent, **extra})
    return path.parent


def test_a_streaming_head_keeps_the_sinks_and_the_most_recent_tokens(tmp_path):
    method = methods.load("duo_attention", f"scorer.patterns={_pattern_dir(tmp_path, [[0.9, 0.1]])}")
    method.scorer.bind_model  # bound by the file: no model needed to plan
    keys = torch.zeros(1, 2, 100, 4)
    from conftest import layer_inputs

    scores = method.scorer.score(layer_inputs(torch.zeros(1, 4, 100, 4), keys))
    budgets, kept = method.plan([scores], 0.55)  # 110 of 200: head 1 streams and keeps 10 (4 sinks + 6 recent)
    assert budgets.tolist() == [[100, 10]]
    assert kept[0][0].tolist() == list(range(100)) and kept[0][1].tolist() == [0, 1, 2, 3, 94, 95, 96, 97, 98, 99]
    # the kvpress preset: the head share, windows as the file's
    preset = methods.load("duo_attention", f"scorer.patterns={_pattern_dir(tmp_path, [[0.9, 0.1]])}", "preset=kvpress")
    assert preset.allocator.budget == "heads" and preset.budget_rule == "kvpress"
    assert preset.plan([scores], 0.5)[0].tolist() == [[100, 10]]


def test_ragged_cache_holds_what_the_budgets_say(tmp_path, tiny_llama):
    from harness.attention import install
    from harness.cache import cache_bytes, kept_per_head, prune
    from harness.pipeline import full_cache_bytes, prefill

    model, _ = tiny_llama
    method = methods.load("duo_attention", f"scorer.patterns={_pattern_dir(tmp_path, [[0.9, 0.1], [0.5, 0.3]])}")
    method.bind_model(model)
    with install(model) as hooks:
        pre = prefill(model, hooks, list(range(10, 110)), method, seed=0)
    budgets, kept = method.plan(pre.scores, 0.5)
    cache = prune(pre.cache, kept)
    assert kept_per_head(cache) == [[100, 10], [80, 10]]
    assert cache_bytes(cache) == full_cache_bytes(pre.cache, 100) * 200 // 400


def test_pattern_files_official_layout_and_checks(tmp_path, tiny_llama):
    model, _ = tiny_llama
    # the official tsv alone: values clipped to [0, 1], windows the official training defaults
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "full_attention_heads.tsv").write_text("1.2\t-0.1\n0.5\t0.25\n")
    p = load_pattern(tmp_path / "alone" / "full_attention_heads.tsv")
    assert p.scores.tolist() == [[1.0, 0.0], [0.5, 0.25]] and (p.sink_size, p.recent_size) == (64, 256)
    # a dir with config.json: its windows; the scorer's own keys win over them
    d = _pattern_dir(tmp_path, [[0.9, 0.1], [0.5, 0.3]], sink=128, recent=256)
    m = methods.load("duo_attention", f"scorer.patterns={d}", "scorer.recent_size=8")
    m.bind_model(model)
    assert m.scorer.windows() == (128, 8) and m.allocator.windows() == (128, 8)
    # another model's shape, or (our files) another model's identity
    from harness.models import build_tiny, model_identity

    wrong = _pattern_dir(tmp_path / "w", [[0.9, 0.1, 0.3]] * 2)
    with pytest.raises(KvbenchError, match=r"2 layers x 3 KV heads; this model has 2 x 2"):
        methods.load("duo_attention", f"scorer.patterns={wrong}").bind_model(model)
    ours = _pattern_dir(tmp_path / "o", [[0.9, 0.1], [0.5, 0.3]], kvbench_model={**model_identity(model), "model": ""})
    with pytest.raises(KvbenchError, match="model_type llama vs qwen3"):
        methods.load("duo_attention", f"scorer.patterns={ours}").bind_model(build_tiny("qwen3")[0])
    (tmp_path / "bad.tsv").write_text("0.1\t0.2\n0.3\n")
    (tmp_path / "text.tsv").write_text("a\tb\n")
    for path, msg in [(tmp_path / "bad.tsv", "rows of different lengths"), (tmp_path / "text.tsv", "not a table"),
                      (tmp_path / "none", "does not exist")]:
        with pytest.raises(KvbenchError, match=msg):
            load_pattern(path)


def test_gated_attention_mixes_full_and_streaming_per_kv_head():
    mask = streaming_mask(6, 1, 2)
    assert mask.int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0],
                                   [1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]]
    from methods._calibration import causal_attention

    class _M:
        layer_idx = 0

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 6, 4, generator=gen) for h in (4, 2, 2))
    full = causal_attention(q, k, v, 0.5)
    stream = causal_attention(q, k, v, 0.5, mask[None, None])
    gates = torch.nn.Parameter(torch.tensor([[1.0, 0.0]]))
    out = _Gated(gates, 1, 2)(_M(), q, k, v, 0.5)
    assert torch.allclose(out[:, :, :2], full[:, :, :2]) and torch.allclose(out[:, :, 2:], stream[:, :, 2:])
    assert not torch.allclose(full[:, :, 2:], stream[:, :, 2:])


def test_the_optimisation_finds_the_reference_model_s_retrieval_layer():
    """On the reference model (trained for retrieval), a short profile on id-space passkeys gives the layer the
    shipped patterns call retrieval (layer 1) higher gates than the streaming layers (2 and 3); with windows that
    cover the whole prompt streaming changes nothing, so the L1 penalty alone drives every gate down."""
    from omegaconf import OmegaConf

    from harness.models import load_model

    model, _ = load_model(OmegaConf.create({"name": "reference", "family": "llama", "path": None, "dtype": "float32",
                                            "device": "cpu", "chat": False}))
    prompts = passkey_prompts(model.config.vocab_size, 2, 384, seed=0)
    scores = profile(model, prompts, 30, 16, 32, seed=0)
    assert float(scores[1].min()) > float(scores[2:].max()), scores
    everything = profile(model, prompts[:1], 10, 16, 4096, seed=0)
    assert float(everything.max()) < 0.9, everything


def test_default_patterns_shipped_for_the_reference_model_else_profiled_at_load(tiny_llama):
    from omegaconf import OmegaConf

    from harness.models import load_model

    ref, _ = load_model(OmegaConf.create({"name": "reference", "family": "llama", "path": None, "dtype": "float32",
                                          "device": "cpu", "chat": False}))
    m = methods.load("duo_attention")
    m.bind_model(ref)
    assert m.scorer.pattern.source.startswith("shipped") and m.scorer.windows() == (64, 256)
    assert "method.scorer.patterns" in m.input_files()
    tiny = methods.load("duo_attention")
    tiny.bind_model(tiny_llama[0])
    assert tiny.scorer.pattern.source.startswith("profiled at load") and tiny.input_files() == {}
    assert tiny.scorer.pattern is tiny.allocator.pattern  # profiled once for both parts


def test_bad_values_are_one_line(capsys, tmp_path):
    from conftest import refused_in_process

    for args, msg in [(["method.allocator.budget=tokens"], "method.allocator.budget"),
                      (["method.scorer.sink_size=-1"], "method.scorer.sink_size"),
                      (["method.scorer.patterns=/no/such/dir"], "does not exist")]:
        line = refused_in_process(capsys, "method=duo_attention", *args, "model=tiny-random", "n_samples=1",
                                  f"hydra.run.dir={tmp_path / 'run'}")
        assert msg in line and not (tmp_path / "run").exists()


def test_the_command_writes_the_official_layout(tmp_path):
    out = tmp_path / "pat"
    proc = subprocess.run([sys.executable, "-m", "methods.duo_attention", "model=tiny-random", "task=random",
                           "n_samples=2", "context_length=96", "steps=3", "sink_size=4", "recent_size=8", f"out={out}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["sink_size"], config["recent_size"], config["num_steps"]) == (4, 8, 3)
    assert load_pattern(out).scores.shape == (2, 2)
    bad = subprocess.run([sys.executable, "-m", "methods.duo_attention", "model=tiny-random", f"out={out}", "steps=0"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "steps" in bad.stderr, bad.stderr
