"""Regenerate tests/fixtures/headkv/budget_cases.json from HeadKV's own budget allocation.

    .venv/bin/python tools/official/dump_headkv_budgets.py <HeadKV checkout> [--commit SHA] [--out PATH]

``<HeadKV checkout>`` is a work tree of github.com/FYYFU/HeadKV. Its ``headkv/snapkv_utils.py`` is imported as it
is and ``ReasonSnapKVCluster(...)`` built per case; the class computes its per-(layer, query head) budgets,
``head_capacity``, in ``__init__`` from the head-score file it opens under its own root
(``Important_Head/head_score/Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json`` for a model name with
"llama"). So each case is run from a temporary root holding a symbolic link to the official module and the
case's score file at that path. Cases: the checkout's published Llama-3 and Mistral retrieval-reasoning files
under several (budget, window, beta, temp), stored in the fixture as their heads' mean scores (one-element
lists, once per file: the mean the official code takes of them is the same number), and small hand-made grids. The commit
comes from ``git rev-parse HEAD`` in the checkout, or ``--commit``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFICIAL_MODULE = "headkv/snapkv_utils.py"
SCORE_PATH = "Important_Head/head_score/Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json"
OUT = REPO_ROOT / "tests/fixtures/headkv/budget_cases.json"
PUBLISHED = {"llama3_r2": "Important_Head/head_score/Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json",
             "mistral_r2": "Important_Head/head_score/Mistral-7B-Instruct-v0.2_retrieval_reasoning_heads.json"}
# (name, published file or None, max_capacity_prompts, window, beta, temp); the official runs: window 8, budgets
# 64 .. 1024, betas 1.005 .. 10 (README, head_start_*.sh), temp 1 (run_longbench.py)
SETTINGS = [
    ("llama3_r2", 128, 8, 1.005, 1.0), ("llama3_r2", 128, 8, 1.5, 1.0), ("llama3_r2", 64, 8, 1.02, 1.0),
    ("llama3_r2", 512, 8, 2.0, 1.0), ("llama3_r2", 1024, 8, 10.0, 1.0), ("llama3_r2", 256, 8, 1.2, 0.5),
    ("llama3_r2", 128, 8, 5.0, 2.0), ("mistral_r2", 128, 8, 1.01, 1.0), ("mistral_r2", 256, 8, 1.5, 1.0),
]
# hand-made grids {"l-h": [scores]}: ties, zero heads, lists of several lengths, one dominant head
HAND = [
    ("hand_2x2_quarters", {"0-0": [1.0], "0-1": [1.0], "1-0": [1.0], "1-1": [1.0]}, 10, 2, 1.5, 1.0),
    ("hand_2x2_dominant", {"0-0": [0.9, 0.7], "0-1": [0.0, 0.0], "1-0": [0.1], "1-1": [0.3, 0.1, 0.2]}, 20, 4, 2.0, 1.0),
    ("hand_2x4_temp2", {f"{l}-{h}": [float(1 + l + 2 * h)] for l in range(2) for h in range(4)}, 36, 4, 1.2, 2.0),
    ("hand_3x2_beta1", {"0-0": [0.5], "0-1": [0.25], "1-0": [0.125], "1-1": [0.0625], "2-0": [0.03125],
                        "2-1": [0.03125]}, 16, 0, 1.0, 1.0),
]


def official_class(root: Path, checkout: Path):
    """The official module imported from ``root/headkv/`` (a link to the checkout's file), so it reads its score
    file under ``root``."""
    (root / "headkv").mkdir(parents=True, exist_ok=True)
    link = root / OFFICIAL_MODULE
    if not link.exists():
        os.symlink(checkout / OFFICIAL_MODULE, link)
    spec = importlib.util.spec_from_file_location("headkv_official_snapkv_utils", link)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReasonSnapKVCluster


def run_case(cls, root: Path, scores: dict, n_layers: int, n_heads: int, capacity: int, window: int, beta: float,
             temp: float) -> list[list[int]]:
    target = root / SCORE_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(scores))
    cluster = cls(window_size=window, base_capacity=capacity, head_choice="reason", beta=beta, temp=temp,
                  layer_idx=0, num_hidden_layers=n_layers, num_attention_heads=n_heads, model="llama")
    return cluster.head_capacity.tolist()


def grid(scores: dict) -> tuple[int, int]:
    keys = [tuple(int(x) for x in k.split("-")) for k in scores]
    return 1 + max(l for l, _ in keys), 1 + max(h for _, h in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--commit")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    if not (checkout / OFFICIAL_MODULE).is_file():
        sys.exit(f"dump_headkv_budgets: {checkout / OFFICIAL_MODULE} not found; pass a checkout of "
                 "github.com/FYYFU/HeadKV")
    commit = args.commit or subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    cases, files = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cls = official_class(root, checkout)
        for name, capacity, window, beta, temp in SETTINGS:
            published = json.loads((checkout / PUBLISHED[name]).read_text().splitlines()[0])
            n_layers, n_heads = grid(published)
            capacities = run_case(cls, root, published, n_layers, n_heads, capacity, window, beta, temp)
            files[name] = {"file": PUBLISHED[name], "scores": {k: [float(np.mean(v))] for k, v in published.items()}}
            cases.append({"name": f"{name}_b{capacity}_beta{beta}_temp{temp}", "scores": name,
                          "n_layers": n_layers, "n_heads": n_heads, "max_capacity_prompts": capacity,
                          "window": window, "beta": beta, "temp": temp, "head_capacity": capacities})
        for name, scores, capacity, window, beta, temp in HAND:
            n_layers, n_heads = grid(scores)
            capacities = run_case(cls, root, scores, n_layers, n_heads, capacity, window, beta, temp)
            cases.append({"name": name, "scores": scores, "n_layers": n_layers, "n_heads": n_heads,
                          "max_capacity_prompts": capacity, "window": window, "beta": beta, "temp": temp,
                          "head_capacity": capacities})
    fixture = {
        "source": {"repo": "https://github.com/FYYFU/HeadKV", "commit": commit, "file": OFFICIAL_MODULE,
                   "code": "ReasonSnapKVCluster.__init__: head_capacity [num_hidden_layers, num_attention_heads], "
                           "the entries each query head keeps beyond its window_size"},
        "generated_by": "tools/official/dump_headkv_budgets.py",
        # the published files' heads as their mean scores; a case's "scores" names one of them or is its own grid
        "published": files,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"{args.out}: {len(cases)} cases from FYYFU/HeadKV {commit[:7]}")


if __name__ == "__main__":
    main()
