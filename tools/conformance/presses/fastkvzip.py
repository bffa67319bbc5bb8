"""Fast KVzip (kvpress FastKVzipPress, defaults): kvbench method fastkvzip (preset=kvpress). kvpress downloads
the authors' gates (``Jang-Hyun/Fast-KVzip``); both sides read instead one local gate file, trained here by
kvbench's recipe (methods/fastkvzip.py) on KVzip scores of the llama family (random ids), without a model
identity, so the qwen3 family (same shapes) reads it too. The runner builds kvpress's ``FastKVzipGate`` modules
from it and sets them on the press (``post_init_from_model`` then loads nothing). FastKVzipPress masks
(``masked_key_indices``, one cut over every layer and head): ``global_cut``.

Make the file (kvbench's venv): ``.venv/bin/python tools/conformance/presses/fastkvzip.py``.
"""
from pathlib import Path

import torch

GATES = "tests/fixtures/kvpress/kvzip_surrogates/fastkvzip.safetensors"  # repository-relative
TOKENIZER = "tests/fixtures/kvpress/models/llama_g1"


def _gates(model):
    from kvpress.presses.fastkvzip_press import FastKVzipGate
    from safetensors.torch import load_file

    tensors = load_file(GATES)
    n_layers = len({k.split(".")[1] for k in tensors})
    gates = []
    for i in range(n_layers):
        state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"layers.{i}.")}
        n_heads, _, sink, dim = state["k_base"].shape
        group = state["q_proj.weight"].shape[0] // (n_heads * dim)
        gate = FastKVzipGate(i, state["q_proj.weight"].shape[1], n_heads, group, torch.float32, dim, sink)
        gate.load_state_dict(state)
        gates.append(gate)
    return gates


def _run(model, ids, press):
    from transformers import DynamicCache

    assert Path(GATES).is_file(), f"run from the repository root ({GATES})"
    press.gates = _gates(model)
    cache = DynamicCache()
    with press(model):
        model.model(input_ids=torch.tensor([ids]), past_key_values=cache)
    return cache


def cases():
    from kvpress.presses.fastkvzip_press import FastKVzipPress

    return [{"press": "FastKVzipPress", "attn": "sdpa", "factory": lambda cr: FastKVzipPress(compression_ratio=cr),
             "method": "fastkvzip", "overrides": {"gates": GATES}, "topk": False, "run": _run}]


def make() -> None:
    """Train the gates on the llama family (kvbench's venv) and write them without a model identity."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from harness.models import load_tokenizer
    from methods._calibration import random_prompts
    from methods.fastkvzip import train

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained("tests/fixtures/kvpress/models/llama", dtype=torch.float32).eval()
    prompts = random_prompts(model.config.vocab_size, 6, 200, seed=2)
    gates, stats = train(model, prompts, load_tokenizer(TOKENIZER), n_tokens=150, seed=0, steps=300,
                         batch_size=256)
    tensors = {f"layers.{i}.{k}": v.detach().float().contiguous() for i, g in enumerate(gates)
               for k, v in g.state_dict().items()}
    save_file(tensors, GATES)  # no identity metadata: the qwen3 family (same shapes) reads it too
    print(GATES, stats)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    make()
