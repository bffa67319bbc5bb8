"""One decode step on a ragged cache against a uniform cache of the same total size (issue 27: ragged <= 1.2x).

A ragged cache is what head-wise budgets (AdaKV, HeadKV, ...) leave: the KV heads of a layer hold different numbers
of entries (``harness.cache.RaggedLayer``, attention ``harness.attention.ragged_attention``). A uniform cache of
the same total holds the mean count in every head (a dense layer). Both are cut with ``harness.cache.prune`` from
one prefill of a RULER niah_single_1 prompt, then decoded greedily (``harness.pipeline.greedy``, EOS off, so each
variant runs exactly ``--steps`` forwards on its cache); the full cache is timed too, for scale. Per repeat the
variants run back to back in alternating order; each ratio is the median over repeats of ``ragged / uniform``
(range in brackets), so a change of machine load between repeats cancels out. A run's step time is the median
of its steps (a step on which other work took the core is left out); the ratios of the median CPU step and of
the mean step (total / steps) are printed beside it.

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

from machine import Stopwatch, machine  # noqa: E402

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


def decode_steps(model, cache, logits, pos: int, steps: int) -> tuple[float, float, float]:
    """``steps`` greedy decode steps on ``cache`` (EOS off, no early end): the median wall-clock and CPU seconds
    of one step, and the mean wall-clock step. The median of the steps of one run leaves out the steps on which
    the machine's other work took the core (on a shared CPU those are a few long ones)."""
    from harness.pipeline import _sync, greedy

    marks = []

    def mark(*_):  # greedy calls it after each forward
        _sync(model.device)
        marks.append((time.perf_counter(), time.process_time()))

    with Stopwatch() as watch:
        marks.append((time.perf_counter(), time.process_time()))
        greedy(model, cache, logits, pos, steps + 1, set(), after_step=mark)  # the first token comes from
        # ``logits``: steps forwards
    walls = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpus = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    return statistics.median(walls), statistics.median(cpus), watch.wall / steps


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

        def run(name: str) -> tuple[float, float, float]:
            cache = prune(done.cache, kept[name])  # a fresh copy: decoding grows it
            return decode_steps(model, cache, done.last_logits, len(ids), steps)

        for name in kept:  # warm-up
            run(name)
        times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in kept}
        for rep in range(repeats):
            order = list(kept) if rep % 2 == 0 else list(reversed(kept))  # no variant always goes first
            for name in order:
                times[name].append(run(name))
    pairs = {f"{n} / uniform": (n, "uniform") for n in kept if n.startswith("ragged")}
    pairs["uniform / full"] = ("uniform", "full")
    # clock 0: median wall step, 1: median CPU step, 2: mean wall step; each ratio is of two runs back to back
    per_repeat = {c: {p: [x[c] / y[c] for x, y in zip(times[a], times[b])] for p, (a, b) in pairs.items()}
                  for c in (0, 1, 2)}
    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "prompt_tokens": len(ids),
        "budget_per_head": budget,
        "per_head_counts_layer0": {n: s[0] for n, s in shapes.items()},
        "total_entries": {n: sum(map(sum, s)) for n, s in shapes.items()},
        "steps": steps,
        "repeats": repeats,
        "step_ms": {n: 1e3 * statistics.median(x[0] for x in t) for n, t in times.items()},
        "step_cpu_ms": {n: 1e3 * statistics.median(x[1] for x in t) for n, t in times.items()},
        "mean_step_ms": {n: 1e3 * statistics.median(x[2] for x in t) for n, t in times.items()},
        "ratios": {n: statistics.median(r) for n, r in per_repeat[0].items()},
        "ratio_range": {n: [min(r), max(r)] for n, r in per_repeat[0].items()},
        "cpu_ratios": {n: statistics.median(r) for n, r in per_repeat[1].items()},
        "mean_step_ratios": {n: statistics.median(r) for n, r in per_repeat[2].items()},
        "target": "ragged / uniform <= 1.2x",
    }


def summary(result: dict) -> str:
    """One line: each ratio with its range, the setting and the machine."""
    m = result["machine"]
    cells = ", ".join(f"{n} = {r:.2f}x ({result['ratio_range'][n][0]:.2f}-{result['ratio_range'][n][1]:.2f}; "
                      f"CPU time {result['cpu_ratios'][n]:.2f}x, mean step {result['mean_step_ratios'][n]:.2f}x)"
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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's own; 1 steadies a CPU shared with other work)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
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
