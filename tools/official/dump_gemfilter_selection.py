"""Regenerate tests/fixtures/gemfilter/selection.json from GemFilter's own selection code
(github.com/SalesforceAIResearch/GemFilter).

    .venv/bin/python tools/official/dump_gemfilter_selection.py <GemFilter checkout> [--commit SHA] [--out PATH]

``<GemFilter checkout>/my_baseline/GemFilter/gem_filter_utils.py`` is loaded as a module (it needs only torch and
transformers' ``repeat_kv``) and its ``standard_dis_index`` run exactly as its ``find_context`` runs it at the
filter layer: keys repeated over the GQA groups, the last query, ``min(topk, n)`` tokens, ``pool=True``,
``sum_over_heads=True``. Per case: the last query ``[H_q, D]``, the keys ``[H_kv, T, D]`` (random), ``k``, and the
official indices, sorted as ``get_layer_context`` sorts them. Inputs are multiples of 1/256 (exact in float32 and in
the JSON), and a case whose k-th and (k+1)-th pooled scores are closer than 1e-3 is refused (a tie there is topk's
choice). The commit comes from ``git rev-parse HEAD`` in the checkout, or ``--commit``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "tests/fixtures/gemfilter/selection.json"
UTILS = "my_baseline/GemFilter/gem_filter_utils.py"
# (name, query heads, KV heads, tokens, head dim, k, seed): MHA and GQA groups of 2, 4, 8; k from 1 to T; prompts
# about as short as the pooling kernel (5; at 3 or 4 tokens the zero-padded pool ties positions by construction)
# and shorter than k
CASES = [
    ("mha_k1", 4, 4, 32, 8, 1, 1),
    ("mha_k8", 4, 4, 32, 8, 8, 2),
    ("gqa2_k10", 4, 2, 50, 8, 10, 3),
    ("gqa4_k16", 8, 2, 64, 8, 16, 4),
    ("gqa8_k3", 8, 1, 40, 8, 3, 5),
    ("gqa2_k_all", 4, 2, 24, 8, 24, 6),
    ("k_over_T", 4, 2, 12, 8, 50, 7),
    ("short_6", 4, 2, 6, 8, 2, 8),
    ("short_5", 2, 1, 5, 4, 2, 9),
    ("long_200", 8, 2, 200, 4, 41, 10),
    ("long_odd_131", 6, 3, 131, 4, 13, 11),
    ("one_head", 1, 1, 17, 4, 5, 12),
]


def load_official(checkout: Path):
    spec = importlib.util.spec_from_file_location("gem_filter_utils", checkout / UTILS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    official = load_official(args.checkout)
    from transformers.models.llama.modeling_llama import repeat_kv

    commit = args.commit or subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"],
                                           capture_output=True, text=True, check=True).stdout.strip()
    cases = []
    for name, n_q, n_kv, n_tokens, dim, k, seed in CASES:
        g = torch.Generator().manual_seed(seed)
        query = (torch.randn(n_q, dim, generator=g) * 256).round() / 256
        keys = (torch.randn(n_kv, n_tokens, dim, generator=g) * 256).round() / 256
        # find_context: the filter layer's last query against every key, repeat_kv over the groups
        repeated = repeat_kv(keys[None], n_q // n_kv)
        _, indices = official.standard_dis_index(repeated, query[None, :, None, :], min(k, n_tokens), pool=True,
                                                 sum_over_heads=True)
        if k < n_tokens:
            ranked, _ = official.standard_dis_index(repeated, query[None, :, None, :], k + 1, pool=True,
                                                    sum_over_heads=True)
            gap = float(ranked[0, 0, k - 1] - ranked[0, 0, k])
            assert gap > 1e-3, f"{name}: the k-th and (k+1)-th scores are {gap:.2g} apart (choose another seed)"
        cases.append({"name": name, "k": k, "last_query": query.tolist(), "keys": keys.tolist(),
                      "selected": indices[0, 0].sort().values.tolist()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": f"SalesforceAIResearch/GemFilter@{commit} {UTILS} standard_dis_index",
                                    "kernel": 5, "cases": cases}) + "\n")
    print(f"{len(cases)} cases -> {args.out}")


if __name__ == "__main__":
    main()
