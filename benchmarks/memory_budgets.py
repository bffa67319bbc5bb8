"""Do head-wise budgets really save memory? KV bytes and decode-time peak RSS: full vs uniform vs AdaKV.

One process prints, side by side, for a tiny-random-like Llama (4 layers, 8 query / 8 KV heads, head_dim 64,
hidden 512, float32) on a 4096-token random context at keep ratio 0.25 (SnapKV scores):

* ``kv_bytes / kv_bytes_full``: bytes of the pruned cache (AdaKV: a RaggedLayer, one tensor per head) over the
  full cache, right after pruning;
* peak RSS while decoding (``decode_peak``: sampled every 1 ms by a thread from /proc/self/statm) and that peak
  minus the RSS after the model was built (``over_model``: prefill leftovers + cache + decode activations), each
  variant in a fresh subprocess, median of ``--repeats`` (3).

The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed large tensors go back to the OS (glibc would
otherwise raise its mmap threshold after the first big free and keep the full cache's pages in the heap,
hiding the saving from RSS), and with 1 torch thread.

    python benchmarks/memory_budgets.py [--tokens 4096] [--ratio 0.25] [--decode 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("full", "uniform", "adakv")
MODEL = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, hidden_size=512, head_dim=64,
             intermediate_size=1024)


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    def __init__(self, period: float = 0.001):
        self.period, self.peak, self._stop = period, rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def child(variant: str, n_tokens: int, ratio: float, n_decode: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import methods
    from harness.attention import install
    from harness.cache import cache_bytes, kept_per_head, prune
    from harness.compat import with_cache
    from harness.models import build_tiny
    from harness.pipeline import prefill

    model, _ = build_tiny("llama", seed=0, **MODEL)
    cfg = {"name": "snapkv", "scorer": None if variant == "full" else "snapkv",
           "allocator": "adakv" if variant == "adakv" else "uniform", "window": 32, "kernel": 7, "pool": "max",
           "n_recent": 32}
    if variant == "full":
        cfg = {"name": "full", "scorer": None}
    method = methods.build_method(cfg)
    ids = torch.randint(8, model.config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    gc.collect()
    rss_model = rss()
    with torch.no_grad(), install(model) as hooks:
        pre = prefill(model, hooks, ids, method, seed=0)
        full_bytes = cache_bytes(pre.cache)
        if method.compresses:
            budgets, kept = method.plan(pre.scores, ratio)
            cache = prune(pre.cache, kept)
        else:
            budgets, cache = None, pre.cache
        logits = pre.last_logits
        del pre
        gc.collect()
        kv_bytes = cache_bytes(cache)
        per_head = kept_per_head(cache)
        rss_start = rss()
        with PeakSampler() as sampler:
            pos = n_tokens
            for _ in range(n_decode):
                token = int(logits.argmax(dim=-1))
                out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]),
                            **with_cache(cache), use_cache=True)
                logits = out.logits[:, -1]
                pos += 1
    return {"variant": variant, "kv_bytes": kv_bytes, "kv_bytes_full": full_bytes, "rss_model": rss_model,
            "rss_decode_start": rss_start, "rss_decode_peak": sampler.peak,
            "ragged": len({n for layer in per_head for n in layer}) > 1,
            "budget_min": min(min(l) for l in per_head), "budget_max": max(max(l) for l in per_head)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.ratio, args.decode)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", v, "--tokens", str(args.tokens), "--ratio",
                                  str(args.ratio), "--decode", str(args.decode)], env=env, cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            results[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 2 ** 20
    print(f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"model: llama {MODEL}, float32; context {args.tokens} tokens, keep_ratio {args.ratio}, SnapKV scores, "
          f"{args.decode} decode steps; RSS median of {args.repeats} fresh processes")
    print(f"{'variant':<9} {'kv_MiB':>8} {'kv/full':>8} {'budgets':>10} {'decode_peak_MiB':>16} {'over_model_MiB':>15} "
          f"{'peak/full_peak':>15}")
    full_over = statistics.median(r["rss_decode_peak"] - r["rss_model"] for r in results["full"])
    full_peak = statistics.median(r["rss_decode_peak"] for r in results["full"])
    for v in VARIANTS:
        rs = results[v]
        kv = statistics.median(r["kv_bytes"] for r in rs)
        ratio = statistics.median(r["kv_bytes"] / r["kv_bytes_full"] for r in rs)
        peak = statistics.median(r["rss_decode_peak"] for r in rs)
        over = statistics.median(r["rss_decode_peak"] - r["rss_model"] for r in rs)
        budgets = f"{rs[0]['budget_min']}-{rs[0]['budget_max']}"
        print(f"{v:<9} {kv / mib:8.2f} {ratio:8.4f} {budgets:>10} {peak / mib:16.1f} {over / mib:15.1f} "
              f"{peak / full_peak:15.3f}")
    print(f"over-model RSS vs full: " + ", ".join(
        f"{v} {statistics.median(r['rss_decode_peak'] - r['rss_model'] for r in results[v]) / full_over:.3f}"
        for v in VARIANTS))
    ada = statistics.median(r["kv_bytes"] / r["kv_bytes_full"] for r in results["adakv"])
    print(f"adakv kv_bytes/kv_bytes_full = {ada:.4f} ({'OK' if ada <= 0.27 else 'FAIL'}: must be <= 0.27)")


if __name__ == "__main__":
    main()
