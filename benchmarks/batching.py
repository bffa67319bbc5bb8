"""Samples per second of the real runner at ``batch_size=8`` against ``batch_size=1`` (issue 27: >= 1.5x).

Each variant is one ``harness.runner.run`` of a composed config (``task=ruler/niah_single_1``, the same samples,
``max_new_tokens=32``) into a fresh directory, for a compressing method (SnapKV at keep 0.25) and for the full
cache. The model is loaded once and handed to every run (``harness.runner.load_model`` is swapped for the
preloaded one), so the time is the runner's own work: building the samples, prefill, scoring, cuts, decoding,
writing rows. Per repeat the two batch sizes run back to back in alternating order; each ratio is the median over
repeats of ``time(batch 1) / time(batch 8)`` (range in brackets; the ratio of CPU times beside it, as
``ragged_decode.py``). Every run's rows must carry the same predictions
and scores as the first batch-1 run (greedy decoding: batching changes no token); a difference is an error.
The configs compose ``model=reference`` (its tokenizer writes the prompts, also for ``--model llama-8b``), so the
runner's length check holds the samples to that config's 16384 positions.

    python benchmarks/batching.py [--context 1024] [--n-samples 16] [--max-new-tokens 32] [--repeats 5]
        [--batch-size 8] [--json out.json]
    python benchmarks/batching.py --model llama-8b --context 8192 --repeats 2   # the GPU variant (bf16)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import Stopwatch, machine  # noqa: E402

# (method, its overrides): a compressing method and the full cache
METHODS = {"snapkv keep 0.25": ["method=snapkv", "keep_ratio=0.25"], "full": ["method=full"]}


@contextmanager
def preloaded(model, tokenizer):
    """Every ``harness.runner.run`` in the block uses ``(model, tokenizer)`` instead of loading its model config:
    loading is no part of a run's time, and the GPU variant's random Llama-3.1-8B has no config to load from."""
    from harness import runner

    previous = runner.load_model
    runner.load_model = lambda cfg: (model, tokenizer)
    try:
        yield
    finally:
        runner.load_model = previous


def compose(overrides: list[str]):
    import conf
    from harness.overrides import Composer

    with Composer(conf.CONF_DIR, "config") as composer:
        return composer.compose(overrides)


def _answers(out_dir: Path) -> dict:
    rows = [json.loads(line) for line in open(out_dir / "predictions.jsonl")]
    failed = [r for r in rows if r.get("error")]
    if failed:
        raise RuntimeError(f"{out_dir}: {len(failed)} rows failed, e.g. {failed[0]['error']}")
    return {(r["task"], r["sample_id"], r["keep_ratio"]): (r["prediction"], r["score"]) for r in rows}


def measure(model, tok, context: int = 1024, n_samples: int = 16, max_new_tokens: int = 32, repeats: int = 5,
            batch_size: int = 8, methods: dict[str, list[str]] | None = None) -> dict:
    """Per method: the runner's seconds at batch size 1 and ``batch_size``, samples per second, the per-repeat
    ratios, and whether every run's predictions and scores equal the first batch-1 run's."""
    from harness.runner import run

    methods = methods or METHODS
    common = ["model=reference", "task=ruler/niah_single_1", f"context_length={context}", f"n_samples={n_samples}",
              f"max_new_tokens={max_new_tokens}", "progress=false"]
    sizes = [1, batch_size]
    configs = {(m, b): compose([*common, *over, f"batch_size={b}"]) for m, over in methods.items() for b in sizes}
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="kvbench-batching-") as tmp, preloaded(model, tok):
        runs = iter(range(10**9))

        def timed_run(cfg) -> tuple[Stopwatch, dict]:
            out_dir = Path(tmp) / f"run{next(runs)}"
            with Stopwatch() as watch:
                run(cfg, out_dir)
            return watch, _answers(out_dir)

        for name in methods:
            reference = timed_run(configs[(name, 1)])[1]  # warm-up, and the answers every run must give
            timed_run(configs[(name, batch_size)])
            times: dict[int, list[float]] = {b: [] for b in sizes}
            cpu: dict[int, list[float]] = {b: [] for b in sizes}
            same = True
            for rep in range(repeats):
                for b in (sizes if rep % 2 == 0 else sizes[::-1]):  # no batch size always goes first
                    watch, answers = timed_run(configs[(name, b)])
                    times[b].append(watch.wall)
                    cpu[b].append(watch.cpu)
                    same = same and answers == reference
            ratios = [one / many for one, many in zip(times[1], times[batch_size])]
            cpu_ratios = [one / many for one, many in zip(cpu[1], cpu[batch_size])]
            out[name] = {
                "median_s": {f"batch {b}": statistics.median(times[b]) for b in sizes},
                "samples_per_s": {f"batch {b}": n_samples / statistics.median(times[b]) for b in sizes},
                "ratio": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
                "cpu_ratio": statistics.median(cpu_ratios),
                "same_predictions_and_scores": same,
                "rows": len(reference),
            }
    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "task": "ruler/niah_single_1",
        "context_length": context,
        "n_samples": n_samples,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "methods": out,
        "target": f"batch {batch_size} / batch 1 samples per second >= 1.5x",
    }


def summary(result: dict) -> str:
    m, b = result["machine"], result["batch_size"]
    cells = "; ".join(
        f"{name}: batch {b} / batch 1 = {r['ratio']:.2f}x ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}; "
        f"CPU time {r['cpu_ratio']:.2f}x), "
        f"{r['samples_per_s'][f'batch {b}']:.2f} vs {r['samples_per_s']['batch 1']:.2f} samples/s, "
        f"{'same' if r['same_predictions_and_scores'] else 'DIFFERENT'} predictions and scores"
        for name, r in result["methods"].items())
    return (f"{cells}; {result['n_samples']} samples of {result['context_length']} tokens, "
            f"{result['max_new_tokens']} new tokens, median of {result['repeats']} repeats; {m['device']}, "
            f"{m.get('cpu', m['platform'])}, {m['threads']} threads, load {m.get('load_average', '?')} "
            "(target >= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", choices=["reference", "llama-8b"])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
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
    for key in ("context", "n_samples", "max_new_tokens", "repeats", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} {getattr(args, key)} must be >= 1")
    from speed import load, load_llama_8b

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model == "llama-8b":
        model, tok = load_llama_8b(device, args.layers)
        label = "Llama-3.1-8B architecture, random weights" + (f", {args.layers} layers" if args.layers else "")
    else:
        model, tok = load("reference")
        model, label = model.to(device), "reference"
    result = {"model": label, **measure(model, tok, args.context, args.n_samples, args.max_new_tokens,
                                        args.repeats, args.batch_size)}
    print(json.dumps(result, indent=2))
    print(summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not all(r["same_predictions_and_scores"] for r in result["methods"].values()):
        sys.exit("batching changed predictions or scores")


if __name__ == "__main__":
    main()
