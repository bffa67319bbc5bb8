"""KVzap (kvpress KVzapPress alone, a ScorerPress: per-head top-k of the surrogate's scores): kvbench method kvzap
(preset=kvpress). kvpress downloads ``nvidia/KVzap-mlp-<model>``; both sides read instead one local KVzap dir in
kvpress's format (``KVzapModel.save_pretrained``: config.json + model.safetensors), an MLP trained here by
kvbench's own recipe (methods/kvzap.py) on KVzip+ scores of the llama family (random ids), without a model
identity, so the qwen3 family (same shapes) reads it too. The runner hands the press the loaded model under the
name its ``post_init_from_model`` would download, so nothing is fetched.

Make the file (kvbench's venv): ``.venv/bin/python tools/conformance/presses/kvzap.py``.
"""
from pathlib import Path

import torch

WEIGHTS = "tests/fixtures/kvpress/kvzip_surrogates/kvzap_mlp"  # repository-relative (the dump runs from the root)
TOKENIZER = "tests/fixtures/kvpress/models/llama_g1"  # the reconstruction prompt's tokenizer (as the kvzip group)


def _run(model, ids, press):
    from kvpress.presses.kvzap_press import KVzapModel
    from transformers import DynamicCache

    assert (Path(WEIGHTS) / "config.json").is_file(), f"run from the repository root ({WEIGHTS})"
    press.kvzap_model = KVzapModel.from_pretrained(WEIGHTS)
    press.kvzap_model_name = f"nvidia/KVzap-{press.model_type}-{model.config.name_or_path.split('/')[-1]}"
    cache = DynamicCache()
    with press(model):
        model.model(input_ids=torch.tensor([ids]), past_key_values=cache)
    return cache


def cases():
    from kvpress import KVzapPress

    return [{"press": "KVzapPress", "attn": "sdpa", "factory": lambda cr: KVzapPress(compression_ratio=cr),
             "method": "kvzap", "overrides": {"weights": WEIGHTS}, "topk": True, "run": _run}]


def make() -> None:
    """Train the MLP on the llama family (kvbench's venv) and write it without a model identity."""
    import json

    from transformers import AutoModelForCausalLM

    from harness.models import load_tokenizer
    from methods._calibration import random_prompts
    from methods.kvzap import save_kvzap, train

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained("tests/fixtures/kvpress/models/llama", dtype=torch.float32).eval()
    prompts = random_prompts(model.config.vocab_size, 6, 200, seed=1)
    net, stats = train(model, prompts, "mlp", load_tokenizer(TOKENIZER), n_tokens=150, seed=0, hidden_dim=32,
                       epochs=10, lr=5e-3, batch_size=64)
    path = save_kvzap(WEIGHTS, net, {})
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("kvbench")  # no identity: the qwen3 family (same shapes) reads it too
    (path / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    print(path, stats)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    make()
