"""The reference model's architectures: small Llamas with GQA, small enough for sub-second 4k prefill on CPU.

``REFERENCE_ARCH`` (v1) is the shipped checkpoint's; ``V2_ARCH`` the v2 recipe's (``--arch``).
"""
from __future__ import annotations

REFERENCE_ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=16384,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    initializer_range=0.02,
)

# The v2 recipe's model (kvbench issue #28): 6 layers, hidden 192, 6 query / 2 KV heads: capacity for all 11
# offline RULER formats and the prose share; ~2.8M parameters (11 MB float32), a 4k prompt well under 1 s on 2 cores.
V2_ARCH = dict(REFERENCE_ARCH, hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
               num_key_value_heads=2, head_dim=32)
ARCHS = {"v1": REFERENCE_ARCH, "v2": V2_ARCH}

TINY_ARCH = dict(REFERENCE_ARCH, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def reference_config(tokenizer, arch: dict | None = None, **overrides):
    from transformers import LlamaConfig

    params = dict(REFERENCE_ARCH if arch is None else arch)
    params.update(overrides)
    params["rope_parameters"] = {"rope_type": "default", "rope_theta": params.pop("rope_theta")}
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **params,
    )
