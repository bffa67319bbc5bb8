"""Model loading at scale (issue #27 item 5): weights read straight onto the device in the run's dtype,
``model.device_map`` (a device, or ``auto`` through accelerate), Phi-3 end to end with its fused ``qkv_proj``, and
the refusals of attention that kvbench would otherwise run as global (sliding windows, soft-capping, partial or
per-layer-type RoPE: Gemma 2 / Gemma 3, Phi-3-mini-4k, Mistral v0.1). Tiny checkpoints are built from configs and
saved to ``tmp_path``, then loaded as ``model=hf model.path=<dir>``."""
import json
from pathlib import Path

import pytest
import torch
from conftest import refused_in_process
from test_pipeline import CTX, QUESTION, _masked_reference, generate, our_tokens
from test_selection import method
from transformers import DynamicCache

import harness.attention
from harness.attention import install
from harness.cache import kept_per_head, prune
from harness.compat import cache_of, with_cache
from harness.errors import KvbenchError
from harness.models import (attention_quirks, build_tiny, input_device, inspect_model, is_attention_module,
                            load_model, placement, sliding_window)
from harness.pipeline import prefill

ROOT = Path(__file__).resolve().parents[1]


def _save_tiny(tmp_path: Path, family: str, **overrides) -> Path:
    model, tok = build_tiny(family, **overrides)
    out = tmp_path / family
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _save_config(tmp_path: Path, config, name: str) -> Path:
    out = tmp_path / name
    config.save_pretrained(out)  # a config alone: the refusals come from config.json, before any weight
    return out


@pytest.fixture
def finds_phi3(monkeypatch):
    """harness.attention finds attention modules by ``k_proj``; Phi-3 has a fused ``qkv_proj``. Until
    attention.py calls ``is_attention_module`` (the lead's file), route the hooks through it here; once it does,
    this patch changes nothing."""
    def modules(model):
        return sorted((m for m in model.modules() if is_attention_module(m)), key=lambda m: m.layer_idx)

    monkeypatch.setattr(harness.attention, "attention_modules", modules)


def _params(model):
    return {name: p for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------- placement


def test_weights_load_onto_the_device_in_the_dtype(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    d = _save_tiny(tmp_path, "llama")
    saved = _params(build_tiny("llama")[0])
    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    for extra, dtype in [({"device": "cpu"}, "bfloat16"), ({"device_map": "cpu"}, "float16"), ({}, "float32")]:
        model, _ = load_model({"name": "hf", "path": str(d), "dtype": dtype, **extra})
        loaded = _params(model)
        assert set(loaded) == set(saved)
        for name, p in loaded.items():
            assert p.dtype == getattr(torch, dtype) and p.device == torch.device("cpu"), name
            assert torch.equal(p, saved[name].to(p.dtype)), name  # the saved weights, cast once
        assert input_device(model) == torch.device("cpu")
    # transformers was told the device: each tensor is read onto it (not built on the host, then moved)
    # straight onto the device through accelerate; without it (an optional extra) transformers takes no device_map
    from harness.models import accelerate_installed

    assert seen == (["cpu"] * 3 if accelerate_installed() else [None] * 3)


def test_device_map_auto_through_accelerate(tmp_path):
    pytest.importorskip("accelerate")
    d = _save_tiny(tmp_path, "qwen3")
    model, _ = load_model({"name": "hf", "path": str(d), "dtype": "float32", "device_map": "auto"})
    want = "cuda" if torch.cuda.is_available() else "cpu"  # accelerate fills the GPUs; the CPU when there is none
    assert {p.device.type for p in model.parameters()} == {want}
    assert input_device(model).type == want
    saved = _params(build_tiny("qwen3")[0])
    assert all(torch.equal(p.cpu(), saved[n]) for n, p in model.named_parameters())
    built, _ = load_model({"name": "tiny-random", "family": "qwen3", "device_map": "auto"})
    assert input_device(built).type == want
    assert all(torch.equal(p.cpu(), saved[n]) for n, p in built.named_parameters())


def test_placement_refusals(monkeypatch):
    assert placement({"device": "cpu"}) == "cpu" == placement({"device_map": "cpu"})
    assert placement({"device": "cpu", "device_map": "cpu"}) == "cpu"
    with pytest.raises(KvbenchError, match="model.device_map=auto places the layers itself; model.device='cpu'"):
        placement({"device": "cpu", "device_map": "auto"})
    if not torch.cuda.is_available():
        with pytest.raises(KvbenchError, match="model.device='cuda:0' but CUDA is not available"):
            placement({"device_map": "cuda:0"})
    monkeypatch.setattr("harness.models.accelerate_installed", lambda: False)
    with pytest.raises(KvbenchError) as err:
        placement({"device_map": "auto"})
    text = str(err.value)
    assert "\n" not in text and "needs accelerate" in text and "kvbench[multi-gpu]" in text, text


def test_device_map_is_checked_before_any_dir(capsys, tmp_path):
    run_dir = tmp_path / "run"
    for value, needle in [("gpu", "model.device_map"), ("cuda:x", "model.device_map"), ("7", "model.device_map")]:
        line = refused_in_process(capsys, "model=tiny-random", f"model.device_map={value}", "n_samples=1",
                                  f"hydra.run.dir={run_dir}")
        assert needle in line and not run_dir.exists(), line


def test_device_map_without_accelerate_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("harness.models.accelerate_installed", lambda: False)
    from harness.overrides import Composer
    from harness.runner import run

    with Composer(ROOT / "conf", "config") as composer:
        cfg = composer.compose(["model=tiny-random", "model.device_map=auto", "method=snapkv", "n_samples=1",
                                "task=ruler/niah_single_1", "context_length=256", "progress=false"])
    needs = r"model.device_map=auto needs accelerate.*pip install 'kvbench\[multi-gpu\]'"
    with pytest.raises(KvbenchError, match=needs):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------- Phi-3


def test_phi3_modules_are_found_by_is_attention_module():
    model, _ = build_tiny("phi3")
    found = [m for m in model.modules() if is_attention_module(m)]
    assert [m.layer_idx for m in found] == [0, 1] and all(hasattr(m, "qkv_proj") for m in found)
    for family in ("llama", "qwen2", "qwen3", "mistral"):  # the same modules as the k_proj rule finds
        other, _ = build_tiny(family)
        assert ([m for m in other.modules() if is_attention_module(m)]
                == [m for m in other.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")])


def test_phi3_full_cache_matches_generate(tmp_path, finds_phi3):
    model, tok = load_model({"name": "hf", "path": str(_save_tiny(tmp_path, "phi3")), "dtype": "float32",
                             "device": "cpu"})
    assert type(model).__name__ == "Phi3ForCausalLM"
    ref = generate(model, CTX + QUESTION, 12)
    assert our_tokens(model, tok, method("full"), 1.0, query_aware=True) == ref
    assert our_tokens(model, tok, method("snapkv"), 1.0, query_aware=False) == ref


@pytest.mark.parametrize("name", ["snapkv", "knorm"])
def test_phi3_kept_entries_are_the_uncompressed_ones(tmp_path, finds_phi3, name):
    """A compressed Phi-3 cache holds the uncompressed prefill's keys and values at the kept positions, and the
    question's logits on it equal the full cache's with the evicted entries masked out."""
    model, tok = load_model({"name": "hf", "path": str(_save_tiny(tmp_path, "phi3")), "dtype": "float32",
                             "device": "cpu"})
    m = method(name)
    n = len(CTX)
    with torch.no_grad():
        full = cache_of(model(input_ids=torch.tensor([CTX]), **with_cache(DynamicCache()), use_cache=True))
    with install(model) as hooks:
        pre = prefill(model, hooks, CTX, m, seed=0)
        assert all(s is not None for s in pre.scores)  # both Phi-3 layers were scored
        _, kept = m.plan(pre.scores, 0.25)
        pruned = prune(pre.cache, kept)
        assert kept_per_head(pruned) == [[n // 4] * 2] * 2
        by_head = []
        for layer, (idx, ours) in enumerate(zip(kept, pruned.layers)):
            idx = [torch.as_tensor(i) for i in idx]
            if name == "knorm":  # Knorm keeps each head's keys of the smallest L2 norm, read off the full cache
                norms = full.layers[layer].keys[0].norm(dim=-1)
                want = [norms[h].topk(n // 4, largest=False).indices.sort().values for h in range(len(idx))]
                assert [i.sort().values.tolist() for i in idx] == [w.tolist() for w in want]
            for h, i in enumerate(idx):
                assert torch.allclose(ours.keys[0, h], full.layers[layer].keys[0, h, i], atol=1e-6)
                assert torch.allclose(ours.values[0, h], full.layers[layer].values[0, h, i], atol=1e-6)
            by_head.append([i.tolist() for i in idx])
        out = model(input_ids=torch.tensor([QUESTION]), position_ids=torch.arange(n, n + len(QUESTION))[None],
                    **with_cache(pruned), use_cache=True)
    ref = _masked_reference(model, full, by_head, QUESTION, n)
    assert torch.allclose(out.logits[0], ref, atol=1e-5)


def test_phi3_runs_end_to_end_through_kvbench(tmp_path, finds_phi3):
    from harness.io import read_rows
    from harness.overrides import Composer
    from harness.runner import run

    d = _save_tiny(tmp_path, "phi3")
    with Composer(ROOT / "conf", "config") as composer:
        cfg = composer.compose(["model=hf", f"model.path={d}", "model.dtype=float32", "model.chat=false",
                                "model.device=cpu", "method=snapkv", "task=ruler/niah_single_1", "n_samples=1",
                                "context_length=512", "max_new_tokens=4", "keep_ratio=[0.25,1.0]",
                                "progress=false"])
    run(cfg, tmp_path / "run")
    rows = {r["keep_ratio"]: r for r in read_rows(tmp_path / "run" / "predictions.jsonl")[0]}
    t = rows[1.0]["context_tokens"]
    assert rows[0.25]["kept_tokens"] == t // 4 and rows[1.0]["kept_tokens"] == t
    assert rows[0.25]["kv_bytes"] * t == rows[0.25]["kv_bytes_full"] * (t // 4)
    assert rows[0.25]["model"] == "phi3" and not rows[0.25].get("error")


# ---------------------------------------------------------------------------------------------------------- refusals


def _gemma3(**kw):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32, **kw)


def _configs():
    from transformers import Gemma2Config, MistralConfig, Phi3Config, Qwen2Config

    small = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    return {
        # Gemma 3's default pattern: 5 local layers per global one (layer_types), local RoPE base 10000
        "gemma3": (_gemma3(), ["Gemma 3", "sliding-window layers (window 32) alternate", "RoPE differs per layer",
                               "sliding_attention 10000.0", "kvpress compresses only its global layers"]),
        "gemma3-all-global": (_gemma3(layer_types=["full_attention"] * 6),
                              ["Gemma 3", "RoPE differs per layer type"]),
        "gemma2": (Gemma2Config(num_hidden_layers=2, **small),
                   ["Gemma 2", "soft-capped (attn_logit_softcapping=50.0)", "sliding-window layers (window 4096)"]),
        # Phi-4-mini: phi3 with RoPE on 3/4 of each head
        "phi3-partial-rope": (Phi3Config(num_hidden_layers=2, partial_rotary_factor=0.75, **small),
                              ["partial_rotary_factor=0.75"]),
    }


@pytest.mark.parametrize("case", list(_configs()))
def test_unsupported_attention_is_refused_in_one_line(capsys, tmp_path, case):
    config, needles = _configs()[case]
    d = _save_config(tmp_path, config, case)
    with pytest.raises(KvbenchError) as err:
        inspect_model({"name": "hf", "path": str(d)})
    text = str(err.value)
    assert "\n" not in text and all(n in text for n in needles), text
    run_dir = tmp_path / "run"
    line = refused_in_process(capsys, "model=hf", f"model.path={d}", "n_samples=1", f"hydra.run.dir={run_dir}")
    assert needles[0] in line and not run_dir.exists(), line


def test_windows_that_hide_nothing_run_as_global(tmp_path):
    from transformers import MistralConfig, Phi3Config

    small = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    # Phi-3-mini-128k / Phi-3.5-mini: sliding_window 262144 over 131072 positions never hides a key
    long = Phi3Config(sliding_window=262144, max_position_embeddings=131072, **small)
    assert attention_quirks(long) == []
    assert inspect_model({"name": "hf", "path": str(_save_config(tmp_path, long, "phi3-128k"))})["model_type"] == "phi3"
    assert attention_quirks(MistralConfig(sliding_window=None, **small)) == []
    assert sliding_window(long) is None
    # one position shorter than the model's range is a window that can hide a key: a limit on the run's length
    assert sliding_window(Phi3Config(sliding_window=131071, max_position_embeddings=131072, **small)) == 131071
    for family in ("llama", "qwen2", "qwen3", "mistral", "phi3"):
        assert attention_quirks(build_tiny(family)[0].config) == [], family


def _windowed():
    from transformers import MistralConfig, Phi3Config, Qwen2Config

    small = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    return {
        # Phi-3-mini-4k-instruct: sliding_window 2047 of 4096 positions
        "phi3-4k": (Phi3Config(num_hidden_layers=2, sliding_window=2047, max_position_embeddings=4096, **small), 2047),
        # Mistral-7B-v0.1: a 4096 window over 32768 positions
        "mistral-window": (MistralConfig(num_hidden_layers=2, sliding_window=4096, max_position_embeddings=32768,
                                         **small), 4096),
        "qwen2-window": (Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=64,
                                     max_window_layers=1, **small), 64),
    }


@pytest.mark.parametrize("case", list(_windowed()))
def test_a_run_longer_than_a_sliding_window_is_refused(capsys, tmp_path, case):
    """A window hides nothing while the prompt and its generation fit in it, so such a model runs up to its window
    (Mistral-7B-v0.1 at 4k) and a longer run is refused before anything is written."""
    config, window = _windowed()[case]
    d = _save_config(tmp_path, config, case)
    assert inspect_model({"name": "hf", "path": str(d)})["sliding_window"] == window
    run_dir = tmp_path / "run"
    line = refused_in_process(capsys, "model=hf", f"model.path={d}", "n_samples=1", f"context_length={window}",
                              "max_new_tokens=8", f"hydra.run.dir={run_dir}")
    assert f"sliding window ({window} positions)" in line and not run_dir.exists(), line


def test_a_sliding_window_changes_outputs():
    """Guard for the refusals: a window shorter than the sequence changes a stock model's logits, so running
    it as a global layer would change results."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.tensor([CTX])
    model, _ = build_tiny("mistral")
    config = json.loads(model.config.to_json_string())
    config["sliding_window"] = 16
    windowed = AutoModelForCausalLM.from_config(type(model.config).from_dict(config), attn_implementation="sdpa")
    windowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, windowed.eval()(ids).logits, atol=1e-4)


def test_weights_load_without_accelerate(monkeypatch):
    """accelerate is an optional extra: without it a checkpoint still loads (into host memory, then moved), as a
    fresh install's `make demo` loads the reference model."""
    from harness import models

    monkeypatch.setattr(models, "accelerate_installed", lambda: False)
    seen = {}
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen["device_map"] = kwargs.get("device_map")
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model({"name": "reference", "device": "cpu", "dtype": "float32"})
    assert "device_map" in seen and seen["device_map"] is None  # transformers would refuse one without accelerate
    assert model.device.type == "cpu" and next(model.parameters()).dtype == torch.float32
