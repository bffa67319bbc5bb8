"""Prefill time of ASL vs a full prefill, side by side in one process (medians over alternating repeats).

    python benchmarks/asl_prefill.py [--model reference|tiny] [--task ruler/niah_single_1] [--samples 3]
        [--context 4096] [--keep-ratio 0.1] [--repeats 3] [--asl-threshold 0.3] [--json out.json]

Prompts: the contexts of the first ``--samples`` samples of ``--task`` (seed 0: the sweep's own samples; the
prefill is query-agnostic, as in the sweep), or ``--task random`` for random token ids. Per prompt, times the
whole prefill call (forward + scoring) of:
  * full: no method (plain causal prefill through the harness);
  * snapkv: the same full-length prefill plus SnapKV's scoring (what ASL costs when no layer qualifies);
  * asl: ASL with its defaults (adaptive layer: the paper's threshold and depth-scaled start / look-back);
  * asl_fixed: ASL forced to select at its start layer, the largest saving ASL's rule can give, which
    shows what the shortened prefill saves on this model.
Prints each method's total over the prompts of its per-prompt medians, the ratio to full, each prompt's
selection layer, and the machine.
The reference checkpoint (harness/reference/checkpoint) is used when present, else a random 8-layer model
of the reference's width (said so on stderr and in the output).
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


def load(model_name: str):
    from omegaconf import OmegaConf

    from harness.models import REFERENCE_DIR, build_tiny, device_for, load_model

    if model_name == "reference" and (REFERENCE_DIR / "config.json").exists():
        model, tok = load_model(OmegaConf.create({"name": "reference", "path": None}))
        return model, tok, "reference checkpoint"
    if model_name == "reference":
        print(f"reference checkpoint absent at {REFERENCE_DIR}: using a random 8-layer Llama of the reference's "
              "width", file=sys.stderr)
    from harness.reference.model import REFERENCE_ARCH

    arch = {k: REFERENCE_ARCH[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads", "head_dim")}
    model, tok = build_tiny("llama", num_hidden_layers=8, **arch)
    return model.to(device_for("auto")), tok, "random 8-layer llama (reference width; checkpoint absent)"


def prompt_contexts(tokenizer, task_name: str, context: int, n: int) -> list[list[int]]:
    """Context ids of the first ``n`` samples of a task (seed 0, as the sweep), or random ids."""
    if task_name == "random":
        g = torch.Generator().manual_seed(0)
        return [torch.randint(3, len(tokenizer), (context,), generator=g).tolist() for _ in range(n)]
    import tasks
    from tasks.base import PromptEncoder

    encoder = PromptEncoder(tokenizer)
    return [encoder.encode_sample(s)[0] for s in tasks.get_task(task_name).samples(encoder, context, n, 0)]


def methods_under_test(asl_overrides: dict):
    import methods

    build = methods.load
    return {"full": build("full"), "snapkv": build("snapkv"), "asl": build("asl", **asl_overrides),
            "asl_fixed": build("asl")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference", choices=["reference", "tiny"])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--task", default="ruler/niah_single_1", help="a task name, or random (random ids)")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--asl-threshold", type=float, default=None,
                        help="ASL's variance-ratio threshold (default: the paper's 0.3, from conf/method/asl.yaml)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from harness.attention import install
    from harness.pipeline import _sync, prefill

    model, tok, model_desc = load(args.model)
    n_layers = model.config.num_hidden_layers
    ms = methods_under_test({} if args.asl_threshold is None else {"threshold": args.asl_threshold})
    start = ms["asl"].scorer.resolved(n_layers)[0]
    ms["asl_fixed"].scorer.fixed_layer = start  # forced at the start layer
    prompts = prompt_contexts(tok, args.task, args.context, args.samples)
    times: dict[str, list[list[float]]] = {name: [[] for _ in prompts] for name in ms}
    extras: dict[str, list[dict]] = {name: [{} for _ in prompts] for name in ms}
    with install(model) as hooks:
        for name, m in ms.items():  # warm-up, once each
            prefill(model, hooks, prompts[0], m, seed=0, keep_ratio=args.keep_ratio)
        for rep in range(args.repeats):
            order = list(ms) if rep % 2 == 0 else list(reversed(ms))  # alternate the order
            for i, ids in enumerate(prompts):
                for name in order:
                    _sync(model.device)
                    t0 = time.perf_counter()
                    pre = prefill(model, hooks, ids, ms[name], seed=0, keep_ratio=args.keep_ratio)
                    _sync(model.device)
                    times[name][i].append(time.perf_counter() - t0)
                    extras[name][i] = pre.extras
                    del pre
    # per prompt: median over repeats; per method: the sum over prompts (the sweep's prefill time)
    med = {name: sum(statistics.median(ts) for ts in per_prompt) for name, per_prompt in times.items()}
    result = {
        "model": model_desc, "n_layers": n_layers, "task": args.task, "samples": len(prompts),
        "context": args.context, "prompt_tokens": [len(p) for p in prompts], "keep_ratio": args.keep_ratio,
        "asl_threshold": ms["asl"].scorer.threshold, "repeats": args.repeats, "total_median_s": med,
        "ratio_to_full": {n: med[n] / med["full"] for n in med},
        "asl": extras["asl"], "asl_fixed": extras["asl_fixed"], "machine": machine(),
    }
    print(f"model: {model_desc}, {n_layers} layers; {args.task}, {len(prompts)} prompt(s) of ~{args.context} "
          f"tokens; keep_ratio {args.keep_ratio}; ASL threshold {result['asl_threshold']}; {args.repeats} "
          "repeats, alternating")
    for name in ms:
        note = ""
        if name.startswith("asl"):
            layers = [e["asl_layer"] for e in extras[name]]
            note = f"  (selection layer per prompt {layers}; -1 = none qualified, SnapKV everywhere)"
        print(f"  {name:10s} {med[name] * 1000:8.1f} ms   x{med[name] / med['full']:.3f} of full{note}")
    print(f"ASL / full prefill: {med['asl'] / med['full']:.3f}; ASL at its start layer / full: "
          f"{med['asl_fixed'] / med['full']:.3f}")
    print("machine:", json.dumps(result["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
