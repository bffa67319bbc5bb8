"""Model loading: ``model=tiny-random`` (built from a config), ``model=reference`` (shipped), ``model=hf``.

Hub ids never reach the network: ``HF_HUB_OFFLINE=1`` is the default here, and a hub id that is not in the
local Hugging Face cache fails at once with a one-line error saying how to pass a local path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from harness.errors import KvbenchError

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
REFERENCE_DIR = Path(__file__).resolve().parent / "reference" / "checkpoint"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_config(family: str, vocab_size: int, **overrides: Any):
    """A 2-layer, GQA model of the given family with random weights (for tests and smoke runs)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=65536,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if family == "qwen3":
        return Qwen3Config(use_sliding_window=False, **common)
    raise KvbenchError(f"model.family={family!r} is not supported; allowed: {', '.join(FAMILIES)}")


def build_tiny(family: str = "llama", seed: int = 0, **overrides: Any):
    from transformers import AutoModelForCausalLM

    from harness.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    config = tiny_config(family, vocab_size=len(tok), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval(), tok


def _resolve_path(path: str | None, name: str) -> str:
    if path is None:
        if name == "reference":
            if not (REFERENCE_DIR / "config.json").exists():
                raise KvbenchError(
                    f"the reference checkpoint is missing at {REFERENCE_DIR}; train it with kvbench-train-reference "
                    "or pass model=tiny-random"
                )
            return str(REFERENCE_DIR)
        raise KvbenchError("model=hf needs model.path=<local checkpoint dir or hub id>")
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise KvbenchError(f"model.path={path!r} has no config.json; pass a Hugging Face checkpoint directory")
        return str(local)
    if "/" not in path or path.startswith((".", "/", "~")):
        raise KvbenchError(f"model.path={path!r} does not exist; pass an existing checkpoint directory")
    # A hub id: allowed only if already in the local cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:
        raise KvbenchError(
            f"model.path={path!r} is a hub id that is not in the local Hugging Face cache and downloads are off "
            f"(HF_HUB_OFFLINE=1); download it where a network exists and pass model.path=/path/to/checkpoint"
        ) from None


def device_for(spec: str | None) -> torch.device:
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def load_model(cfg) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a ``model`` config node (name, family, path, dtype, device)."""
    name = cfg.get("name")
    dtype_name = cfg.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise KvbenchError(f"model.dtype={dtype_name!r} is not supported; allowed: {', '.join(DTYPES)}")
    device = device_for(cfg.get("device", "auto"))
    if name == "tiny-random":
        model, tok = build_tiny(cfg.get("family", "llama"), seed=int(cfg.get("seed", 0)))
        return model.to(device=device, dtype=DTYPES[dtype_name]), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _resolve_path(cfg.get("path"), name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name], attn_implementation="sdpa")
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in FAMILIES:
        raise KvbenchError(
            f"model.path={path!r} is a {model_type!r} model; supported families: {', '.join(FAMILIES)}"
        )
    return model.to(device).eval(), tok


def max_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
