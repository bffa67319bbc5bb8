"""Regenerate tests/fixtures/cake/cases.json from CAKE's own code (github.com/antgroup/cakekv).

    <python with transformers==4.43.3> tools/official/dump_cake_budgets.py <cakekv checkout> [--commit SHA] [--out PATH]

The official code is tested with transformers 4.43.3 and imports names later versions dropped (``HybridCache``,
the Llama attention classes), so run this with a Python that has that version (a scratch venv: ``pip install
transformers==4.43.3 'huggingface_hub<0.25' tokenizers==0.19.1`` next to torch and numpy). ``<cakekv checkout>``
is put on ``sys.path`` and its modules imported as they are.

* **budget cases**: layer preferences given as numbers; for each layer in turn, as ``llama_attn_forward_cake``
  does after a layer's prefill, the official ``CakeCache`` gets the layer's (random) keys, its preference and
  (random) token scores, its ``key_size``, and ``CakeprefillKVCache(..., use_cascading=...)`` is called; recorded:
  the prefix entries each layer holds at the end, with and without the cascade, and the last step's
  ``adjust_budgets`` output (``cake/utils.py``) before the official cut at ``T - window``.
* **attention cases**: the official ``llama_attn_forward_cake`` run on a transformers-4.43 ``LlamaFlashAttention2``
  of each layer, its RoPE'd queries and keys replaced by fixed ones (``apply_rotary_pos_emb`` of the official
  module stubbed to return them: the official preference, token scores and cascade then run on exactly these);
  the flash-attention call after them needs the flash_attn package and fails, and is skipped. Recorded per layer:
  the window's queries, the keys, the official preference score, its token scores (``update_score``'s argument,
  before any trim) and the prefix positions each KV head keeps at the end.

The commit comes from ``git rev-parse HEAD`` in the checkout, or ``--commit``.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "tests/fixtures/cake/cases.json"

_RNG = random.Random(7)
# (name, preferences, T, cache_size, window): every layer's prefix budget below and at its cap, ties, remainders,
# budgets under one entry a layer, a dominant layer whose excess is spread twice
BUDGET_CASES = [
    ("even_4", [1.0, 1.0, 1.0, 1.0], 100, 40, 8),
    ("skewed_4", [0.1, 0.2, 0.3, 0.4], 100, 40, 8),
    ("remainders_3", [1.0, 1.0, 1.0], 64, 20, 4),
    ("dominant_capped_4", [10.0, 1.0, 1.0, 1.0], 64, 40, 8),
    ("two_capped_6", [5.0, 4.0, 0.1, 0.1, 0.1, 0.1], 80, 50, 8),
    ("tiny_8", [0.3, 0.1, 0.05, 0.2, 0.1, 0.1, 0.1, 0.05], 100, 9, 8),
    ("zero_layer_4", [1.0, 0.0, 2.0, 3.0], 100, 30, 4),  # a first layer at 0 divides 0 by 0 in the official code
    ("steep_5", [1e-6, 1e-3, 1.0, 1e-3, 1e-6], 128, 48, 16),
    ("near_caps_6", [3.0, 2.9, 2.8, 0.2, 0.1, 0.05], 100, 86, 8),
    ("recap_loss_3", [10.0, 8.0, 1.0], 100, 80, 8),  # pass 1 puts layer 1 above its cap: the official loses 9
    ("cascade_short_4", [0.61, 0.26, 0.5, 0.01], 64, 30, 8),
    ("cascade_short_8", [0.9, 0.2, 0.2, 0.001, 0.001, 0.3, 0.3, 0.2], 64, 19, 16),
    ("long_12", [_RNG.random() ** 3 for _ in range(12)], 257, 100, 16),
]
# (name, n_layers, q heads, kv heads, head dim, T, cache_size, window, tau1, tau2, gamma, seed)
ATTENTION_CASES = [
    ("attn_default", 4, 4, 2, 4, 40, 16, 8, 1.0, 1.0, 200.0, 1),
    ("attn_tau", 4, 4, 2, 4, 40, 20, 8, 1.6, 0.4, 200.0, 2),
    ("attn_gamma0", 3, 4, 2, 4, 48, 20, 8, 1.0, 1.0, 0.0, 3),
]


def decimals(t: torch.Tensor):
    """A float32 tensor of 3-decimal values as nested lists of those decimals (parsed back to the same float32)."""
    return torch.round(t.double(), decimals=3).tolist()


def budget_case(cake_cache, prefill_evict, prefs, T, cache_size, window, cascading, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_layers = len(prefs)
    cache = cake_cache.CakeCache()
    evict = prefill_evict(cache_size=cache_size, window_size=window, num_heads=2, num_layers=n_layers,
                          use_cascading=cascading)
    for layer in range(n_layers):
        cache.update(torch.randn(1, 2, T, 4, generator=g), torch.randn(1, 2, T, 4, generator=g), layer)
        cache.update_score(np.float32(prefs[layer]), torch.rand(1, 2, T - window, generator=g))
        cache.layer_budget.append(cache_size - window)
        cache = evict(cache, T)
    return [int(cache.key_cache[l].shape[2]) - window for l in range(n_layers)]


def attention_case(modeling, cake_cache, name, n_layers, n_q, n_kv, dim, T, cache_size, window, tau1, tau2, gamma,
                   seed):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaFlashAttention2

    g = torch.Generator().manual_seed(seed)
    config = LlamaConfig(hidden_size=n_q * dim, num_attention_heads=n_q, num_key_value_heads=n_kv,
                         num_hidden_layers=n_layers, intermediate_size=8, vocab_size=16)
    config.key_size = [cache_size - window] * n_layers  # pred_cake.py's load_model_and_tokenizer
    config.window_size = [window] * n_layers
    config.prefill = [True] * n_layers
    config.decoding_evict = [None] * n_layers
    config.tau1, config.tau2, config.gamma = tau1, tau2, gamma
    config.prefill_cake_evict = [cake_cache.CakeprefillKVCache(cache_size=cache_size, window_size=window,
                                                               num_heads=n_q, num_layers=n_layers,
                                                               use_cascading=True)] * n_layers
    cache = cake_cache.CakeCache()
    seen: list = []
    original_update = cache.update_score
    cache.update_score = lambda pref, hh: (seen.append((float(pref), hh.clone())), original_update(pref, hh))
    layers = []
    for layer in range(n_layers):
        # 3 decimals: the fixture's JSON numbers are then exactly these float32 values
        window_q = (torch.randn(1, n_q, window, dim, generator=g) * 2).round(decimals=3)
        keys = (torch.randn(1, n_kv, T, dim, generator=g) * 2).round(decimals=3)
        queries = torch.cat([torch.zeros(1, n_q, T - window, dim), window_q], dim=2)
        modeling.apply_rotary_pos_emb = lambda q, k, cos, sin, _q=queries, _k=keys: (_q, _k)
        module = LlamaFlashAttention2(config, layer_idx=layer).eval()
        hidden = torch.randn(1, T, n_q * dim, generator=g)
        try:
            with torch.no_grad():
                modeling.llama_attn_forward_cake(module, hidden, position_ids=torch.arange(T)[None],
                                                 past_key_value=cache, position_embeddings=(None, None))
        except (NameError, ImportError, RuntimeError):  # flash attention, after the official eviction
            pass
        layers.append({"window_queries": decimals(window_q[0]), "keys": decimals(keys[0])})
    for layer, entry in enumerate(layers):
        keys = torch.tensor(entry["keys"], dtype=torch.float32)
        kept_prefix = cache.key_cache[layer][0, :, :-window]
        kept = [sorted(int((keys[h, : T - window] == row).all(-1).nonzero()[0, 0]) for row in kept_prefix[h])
                for h in range(n_kv)]
        scores = [[float(f"{x:.7g}") for x in row] for row in seen[layer][1][0].tolist()]  # float32's digits
        entry.update({"preference": seen[layer][0], "token_scores": scores, "kept": kept})
    return {"name": name, "n_layers": n_layers, "n_heads": n_q, "n_kv_heads": n_kv, "head_dim": dim, "T": T,
            "cache_size": cache_size, "window": window, "tau1": tau1, "tau2": tau2, "gamma": gamma, "layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--commit")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    if not (checkout / "cake" / "cake_cache.py").is_file():
        sys.exit(f"dump_cake_budgets: {checkout}/cake/cake_cache.py not found; pass a checkout of github.com/antgroup/cakekv")
    sys.path.insert(0, str(checkout))
    import cake.cake_cache as cake_cache
    import cake.model.modify_llama as modeling
    from cake.utils import adjust_budgets

    commit = args.commit or subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    budgets = []
    for name, prefs, T, cache_size, window in BUDGET_CASES:
        total = (cache_size - window) * len(prefs)
        last = adjust_budgets([p / sum(prefs) * total for p in prefs], total, T - window, len(prefs))
        budgets.append({"name": name, "preferences": prefs, "T": T, "cache_size": cache_size, "window": window,
                        "adjust_budgets": [int(b) for b in last],
                        "kept_cascade": budget_case(cake_cache, cake_cache.CakeprefillKVCache, prefs, T, cache_size,
                                                    window, True),
                        "kept_no_cascade": budget_case(cake_cache, cake_cache.CakeprefillKVCache, prefs, T,
                                                       cache_size, window, False)})
    attention = [attention_case(modeling, cake_cache, *case) for case in ATTENTION_CASES]
    fixture = {
        "source": {"repo": "https://github.com/antgroup/cakekv", "commit": commit,
                   "files": ["cake/model/modify_llama.py", "cake/cake_cache.py", "cake/utils.py"]},
        "generated_by": "tools/official/dump_cake_budgets.py (transformers 4.43.3)",
        "budget_cases": budgets,
        "attention_cases": attention,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"{args.out}: {len(budgets)} budget and {len(attention)} attention cases from antgroup/cakekv {commit[:7]}")


if __name__ == "__main__":
    main()
