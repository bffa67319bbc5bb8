"""One decode step on a ragged cache against a uniform cache of the same total size (issue 27: ragged <= 1.2x).

A ragged cache is what head-wise budgets (AdaKV, HeadKV, ...) leave: the KV heads of a layer hold different numbers
of entries (``harness.cache.RaggedLayer``, attention ``harness.attention.ragged_attention``). A uniform cache of
the same total holds the mean count in every head (a dense layer). Both are cut with ``harness.cache.prune`` from
one prefill of a RULER niah_single_1 prompt, then decoded greedily (``harness.pipeline.greedy``, EOS off, so each
variant runs exactly ``--steps`` forwards on its cache); the full cache is timed too, for scale. Per repeat the
variants run back to back in alternating order; each ratio is the median over repeats of ``ragged / uniform``
(range in brackets), so a change of machine load between repeats cancels out.

Per-head counts: ``--splits 200,312 64,448`` are patterns repeated over a layer's KV heads (the reference model
has 2; Llama-3.1-8B 8), each averaging ``--budget`` (256), the count of every head of the uniform cache. Which
entries a head keeps (evenly spaced over the prompt, the last one included) does not change a step's cost.

    python benchmarks/ragged_decode.py [--context 1024] [--budget 256] [--splits 200,312 64,448] [--steps 64]
        [--repeats 11] [--json out.json]
    python benchmarks/ragged_decode.py --model llama-8b --context 32768 --budget 8192   # the GPU variant (bf16)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402

DEFAULT_SPLITS = [[200, 312], [64, 448]]


def parse_split(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"split {text!r} is not a comma list of integers, e.g. 200,312") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"split {text!r}: every count must be >= 1")
    return counts


def scaled_splits(budget: int, splits: list[list[int]] = DEFAULT_SPLITS, base: int = 256) -> list[list[int]]:
    """``splits`` (patterns averaging ``base``) rescaled to average ``budget``: the same unevenness at another
    size (the GPU variant keeps a quarter of 32k). The last count takes the rounding, so the mean is exact."""
    out = []
    for split in splits:
        head = [max(1, round(c * budget / base)) for c in split[:-1]]
        out.append(head + [budget * len(split) - sum(head)])
    return out


def head_counts(split: list[int], n_heads: int, budget: int) -> list[int]:
    """``split`` repeated over ``n_heads`` KV heads; refused unless it tiles them and averages ``budget``."""
    if n_heads % len(split) or sum(split) != budget * len(split):
        raise ValueError(f"split {split} must tile {n_heads} KV heads and average the budget {budget} "
                         f"(sum {budget * len(split)})")
    return split * (n_heads // len(split))


def spaced(count: int, length: int) -> torch.Tensor:
    """``count`` sorted distinct positions spread evenly over ``range(length)``, the last one included."""
    if count > length:
        raise ValueError(f"a head cannot keep {count} entries of a {length}-token prompt")
    return torch.linspace(0, length - 1, count).round().long()


def decode_steps(model, cache, logits, pos: int, steps: int) -> float:
    """Seconds per forward of ``steps`` greedy decode steps on ``cache`` (EOS off, no early end)."""
    from harness.pipeline import _sync, greedy

    _sync(model.device)
    start = time.perf_counter()
    greedy(model, cache, logits, pos, steps + 1, set())  # the first token comes from ``logits``: steps forwards
    _sync(model.device)
    return (time.perf_counter() - start) / steps


def measure(model, tok, context: int = 1024, budget: int = 256, splits: list[list[int]] | None = None,
            steps: int = 64, repeats: int = 11) -> dict:
    """Per-step decode time of the full, uniform and each ragged cache, and the per-repeat ratios."""
    from speed import prompt

    import methods
    from harness.attention import install
    from harness.cache import kept_per_head, prune
    from harness.pipeline import prefill

    splits = splits or DEFAULT_SPLITS
    ctx, q = prompt(tok, context)
    ids = ctx + q
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    patterns = {"uniform": [budget] * n_heads}
    patterns.update({"ragged " + ",".join(map(str, s)): head_counts(s, n_heads, budget) for s in splits})
    with torch.no_grad(), install(model) as hooks:
        done = prefill(model, hooks, ids, methods.load("full"), seed=0)
        kept = {"full": [None] * n_layers}
        for name, counts in patterns.items():
            heads = [spaced(c, len(ids)) for c in counts]
            # uniform: one [H, b] index tensor (a dense layer); ragged: one tensor per head (a RaggedLayer)
            kept[name] = [torch.stack(heads) if name == "uniform" else heads for _ in range(n_layers)]
        shapes = {name: kept_per_head(prune(done.cache, k)) for name, k in kept.items()}

        def run(name: str) -> float:
            cache = prune(done.cache, kept[name])  # a fresh copy: decoding grows it
            return decode_steps(model, cache, done.last_logits, len(ids), steps)

        for name in kept:  # warm-up
            run(name)
        times: dict[str, list[float]] = {name: [] for name in kept}
        for rep in range(repeats):
            order = list(kept) if rep % 2 == 0 else list(reversed(kept))  # no variant always goes first
            for name in order:
                times[name].append(run(name))
    ragged = [n for n in kept if n.startswith("ragged")]
    per_repeat = {f"{n} / uniform": [r / u for r, u in zip(times[n], times["uniform"])] for n in ragged}
    per_repeat["uniform / full"] = [u / f for u, f in zip(times["uniform"], times["full"])]
    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "prompt_tokens": len(ids),
        "budget_per_head": budget,
        "per_head_counts_layer0": {n: s[0] for n, s in shapes.items()},
        "total_entries": {n: sum(map(sum, s)) for n, s in shapes.items()},
        "steps": steps,
        "repeats": repeats,
        "median_step_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
        "ratios": {n: statistics.median(r) for n, r in per_repeat.items()},
        "ratio_range": {n: [min(r), max(r)] for n, r in per_repeat.items()},
        "target": "ragged / uniform <= 1.2x",
    }


def summary(result: dict) -> str:
    """One line: each ratio with its range, the setting and the machine."""
    m = result["machine"]
    cells = ", ".join(f"{n} = {r:.2f}x ({result['ratio_range'][n][0]:.2f}-{result['ratio_range'][n][1]:.2f})"
                      for n, r in result["ratios"].items())
    return (f"{cells}; {result['prompt_tokens']}-token prompt, {result['budget_per_head']} entries per head on "
            f"average, {result['steps']} steps, median of {result['repeats']} repeats; {m['device']}, "
            f"{m.get('cpu', m['platform'])}, {m['threads']} threads, load {m.get('load_average', '?')} "
            f"(target: ragged / uniform <= 1.2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", choices=["reference", "llama-8b"])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=256, help="entries per KV head of the uniform cache")
    parser.add_argument("--splits", type=parse_split, nargs="+", default=None,
                        help="per-head count patterns, each averaging --budget (default: 200,312 64,448 scaled "
                             "to --budget)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--layers", type=int, default=None, help="llama-8b only: fewer layers (a CPU smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for key in ("context", "budget", "steps", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} {getattr(args, key)} must be >= 1")
    from speed import load, load_llama_8b

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model == "llama-8b":
        model, tok = load_llama_8b(device, args.layers)
        label = "Llama-3.1-8B architecture, random weights" + (f", {args.layers} layers" if args.layers else "")
    else:
        model, tok = load("reference")
        model, label = model.to(device), "reference"
    splits = args.splits or scaled_splits(args.budget)
    try:
        result = {"model": label, **measure(model, tok, args.context, args.budget, splits, args.steps, args.repeats)}
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps(result, indent=2))
    print(summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
