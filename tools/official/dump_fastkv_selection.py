"""Regenerate tests/fixtures/fastkv/selection.json from FastKV's own selection code (github.com/dongwonjo/FastKV).

    .venv/bin/python tools/official/dump_fastkv_selection.py <FastKV checkout> [--commit SHA] [--out PATH]

``<FastKV checkout>/baselines/fastkv/utils.py`` is loaded as a module (it needs only torch and transformers'
``Cache``) and ``FastKVCluster.update_kv`` run as the TSP layer runs it (``tsp_layer=True``, ``eviction_mode
"constant"``: ``max_capacity_prompt`` and ``tsp_length`` given as counts). Per case: post-RoPE queries
``[H_q, T, D]`` and keys ``[H_kv, T, D]``, random multiples of 1/256 (exact in float32 and in the JSON; only the
last ``window`` queries are stored, nothing reads the others), the window, kernel, pooling, capacity and TSP
length, and the official outputs: the TSP indices, and each KV head's cached positions (the values passed in are
the positions themselves, so the compressed values say which entries were kept, in the official order: top-k,
then the window). A draw whose last kept and first dropped scores are closer than 1e-6 at the TSP cut (or, with
average pooling, at a head's cut) is skipped for the next seed (``seed + 1000``, ...): a tie there is topk's
choice. Max-pooling makes plateaus of equal scores at most heads' cuts: those heads' cached positions are
recorded as None. The commit comes from ``git rev-parse HEAD`` in the checkout, or ``--commit``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "tests/fixtures/fastkv/selection.json"
UTILS = "baselines/fastkv/utils.py"
# (name, query heads, KV heads, tokens, head dim, window, kernel, pooling, capacity, TSP length, seed): MHA and GQA
# groups of 2 and 4, FastKV's window 8 and ASL's 32, kernels 7 and 5, both poolings, a TSP length below, at and
# above the capacity
CASES = [
    ("mha_avg", 4, 4, 64, 8, 8, 7, "avgpool", 24, 24, 1),
    ("mha_max", 4, 4, 64, 8, 8, 7, "maxpool", 24, 24, 2),
    ("gqa2_avg", 4, 2, 80, 8, 8, 7, "avgpool", 20, 40, 3),
    ("gqa2_max", 4, 2, 80, 8, 8, 7, "maxpool", 20, 40, 4),
    ("gqa4_avg", 8, 2, 96, 4, 8, 5, "avgpool", 32, 16, 5),
    ("gqa4_max", 8, 2, 96, 4, 8, 5, "maxpool", 32, 16, 6),
    ("window32_avg", 4, 2, 128, 4, 32, 7, "avgpool", 48, 48, 7),
    ("window32_max", 4, 2, 128, 4, 32, 7, "maxpool", 48, 64, 8),
    ("mqa_avg", 4, 1, 60, 4, 8, 7, "avgpool", 15, 30, 9),
    ("long_avg", 8, 4, 201, 4, 8, 7, "avgpool", 41, 41, 10),
    ("long_max", 8, 4, 201, 4, 8, 7, "maxpool", 50, 100, 11),
    ("kernel1", 4, 2, 50, 8, 8, 1, "avgpool", 18, 12, 12),
]


def load_official(checkout: Path):
    spec = importlib.util.spec_from_file_location("fastkv_utils", checkout / UTILS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pooled(queries: torch.Tensor, keys: torch.Tensor, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """The official ``attn_cache`` ``[H_kv, T - window]`` (update_kv's steps), for the tie check only."""
    n_q, n_kv, n_tokens = queries.shape[0], keys.shape[0], keys.shape[1]
    k = keys.repeat_interleave(n_q // n_kv, dim=0)
    logits = queries[:, -window:] @ k.transpose(1, 2) / math.sqrt(queries.shape[-1])
    causal = torch.arange(n_tokens)[None, :] <= torch.arange(n_tokens - window, n_tokens)[:, None]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    summed = probs[:, :, :-window].sum(dim=1)
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    return pool(summed[None], kernel, padding=kernel // 2, stride=1)[0].view(n_kv, -1, n_tokens - window).sum(dim=1)


def gap(scores: torch.Tensor, k: int) -> float:
    ranked = scores.sort(descending=True).values
    return float(ranked[k - 1] - ranked[k]) if k < ranked.numel() else math.inf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    official = load_official(args.checkout)
    commit = args.commit or subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"],
                                           capture_output=True, text=True, check=True).stdout.strip()
    cases = []
    for name, n_q, n_kv, n_tokens, dim, window, kernel, pooling, capacity, tsp_len, seed in CASES:
        for attempt in range(100):  # the first seed of seed, seed + 1000, ... with no tie at a cut
            g = torch.Generator().manual_seed(seed + 1000 * attempt)
            queries = (torch.randn(n_q, n_tokens, dim, generator=g) * 256).round() / 256
            keys = (torch.randn(n_kv, n_tokens, dim, generator=g) * 256).round() / 256
            scores = pooled(queries, keys, window, kernel, pooling)
            heads_clear = all(gap(scores[h], capacity - window) > 1e-6 for h in range(n_kv))
            if gap(scores.sum(dim=0), tsp_len - window) > 1e-6 and (heads_clear or pooling == "maxpool"):
                break
        else:
            raise AssertionError(f"{name}: every seed tried ties at a cut")
        positions = torch.arange(n_tokens, dtype=torch.float32)[None, None, :, None].expand(1, n_kv, n_tokens, dim)
        cluster = official.FastKVCluster(window_size=window, max_capacity_prompt=capacity, kernel_size=kernel,
                                         pooling=pooling, tsp_layer=True, tsp_length=tsp_len,
                                         eviction_mode="constant")
        _, kept_values, tsp = cluster.update_kv(keys[None], queries[None], positions.contiguous(), None,
                                                n_q // n_kv, 0)
        cases.append({"name": name, "window": window, "kernel": kernel, "pooling": pooling, "capacity": capacity,
                      "tsp_length": tsp_len, "window_queries": queries[:, -window:].tolist(), "keys": keys.tolist(),
                      "tsp": tsp[0].tolist(),
                      # per KV head, None where max-pooling's plateaus tie at the head's cut
                      "cached": [kept_values[0, h, :, 0].long().tolist()
                                 if gap(scores[h], capacity - window) > 1e-6 else None for h in range(n_kv)]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": f"dongwonjo/FastKV@{commit} {UTILS} FastKVCluster.update_kv",
                                    "cases": cases}) + "\n")
    print(f"{len(cases)} cases -> {args.out}")


if __name__ == "__main__":
    main()
