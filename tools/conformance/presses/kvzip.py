"""KVzip (kvpress KVzipPress, defaults): kvbench method kvzip (preset=kvpress). KVzipPress loads
``AutoTokenizer.from_pretrained(model.config.name_or_path)`` to encode its reconstruction prompt, and the two tiny
families have no tokenizer: the runner points ``name_or_path`` at the byte-level tokenizer of ``llama_g1``
(ids 3 + byte, all inside the families' 512 ids; no chat template, so kvpress's prefix is empty and its suffix
"\\n") while the press runs, and kvbench reads the same dir (``method.scorer.tokenizer``). KVzipPress masks
(``masked_key_indices``, one cut over every layer and head): ``global_cut``, compared per head and per layer total.
"""
from pathlib import Path

import torch

TOKENIZER = "tests/fixtures/kvpress/models/llama_g1"  # repository-relative (the dump runs from the root)


def _run(model, ids, press):
    from transformers import DynamicCache

    assert (Path(TOKENIZER) / "tokenizer.json").is_file(), f"run from the repository root ({TOKENIZER})"
    saved = model.config.name_or_path
    model.config.name_or_path = TOKENIZER
    cache = DynamicCache()
    try:
        with press(model):
            model.model(input_ids=torch.tensor([ids]), past_key_values=cache)
    finally:
        model.config.name_or_path = saved
    return cache


def cases():
    from kvpress import KVzipPress

    return [{"press": "KVzipPress", "attn": "sdpa", "factory": lambda cr: KVzipPress(compression_ratio=cr),
             "method": "kvzip", "overrides": {"tokenizer": TOKENIZER}, "topk": False, "run": _run}]
