"""Write the Q-Filters file both sides of the ``qfilter`` conformance group read
(``tests/fixtures/kvpress/qfilters/tiny.safetensors``), with kvbench's own calibration (methods/qfilter.py).

Run in kvbench's environment from the repository root:

    .venv/bin/python tools/conformance/qfilters_fixture.py

The two tiny fixture models (tests/fixtures/kvpress/models/{llama,qwen3}: 3 layers x 2 KV heads x head_dim 16)
have no tokenizer, so ``python -m methods.qfilter`` cannot load them; this script runs the command's calibration
(``methods.qfilter._QueryStats``) on 4 random-id contexts of 256 tokens per model and sums both models' query
statistics into one set of filters. The file is in the published format (the ``q_filters`` tensor alone, no
metadata), so both families accept it by its shape: kvpress's ``QFilterPress`` gets it in place of its hub
download (tools/conformance/presses/qfilter.py), kvbench's ``qfilter`` method through
``method.scorer.filters``. What is compared is the scoring and selection, given the same filters.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "tests" / "fixtures" / "kvpress" / "qfilters" / "tiny.safetensors"


def main() -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from methods._calibration import attention_function, random_prompts
    from methods.qfilter import _QueryStats

    torch.set_num_threads(1)
    stats = _QueryStats()
    for family in ("llama", "qwen3"):
        model = AutoModelForCausalLM.from_pretrained(ROOT / "tests" / "fixtures" / "kvpress" / "models" / family,
                                                     dtype=torch.float32).eval()
        with torch.no_grad(), attention_function(model, stats):
            for ids in random_prompts(model.config.vocab_size, 4, 256, seed=0):
                model(input_ids=torch.tensor([ids]), use_cache=False)
    filters = stats.filters()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({"q_filters": filters.contiguous()}, str(OUT))
    print(f"{OUT.relative_to(ROOT)}: q_filters {tuple(filters.shape)}")


if __name__ == "__main__":
    main()
