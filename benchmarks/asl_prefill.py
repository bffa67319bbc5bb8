"""Prefill time of ASL vs a full prefill, side by side in one process (medians over alternating repeats).

    python benchmarks/asl_prefill.py [--model reference|tiny] [--context 4096] [--keep-ratio 0.25] [--repeats 3]
                                     [--asl-threshold 0.3] [--json out.json]

Times the whole prefill call (forward + scoring) of:
  * full: no method (plain causal prefill through the harness);
  * snapkv: the same full-length prefill plus SnapKV's scoring (what ASL costs when no layer qualifies);
  * asl: ASL with its defaults (adaptive layer; on a random model usually none qualifies);
  * asl_fixed: ASL forced to select at its start layer, the largest saving ASL's rule can give, which
    shows what the shortened prefill saves on this model.
Prints each median, the ratio to full, the selection layer and kept tokens, and the machine.
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


def methods_under_test(asl_overrides: dict):
    import methods

    build = methods.load
    return {"full": build("full"), "snapkv": build("snapkv"), "asl": build("asl", **asl_overrides),
            "asl_fixed": build("asl")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference", choices=["reference", "tiny"])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
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
    ids = torch.randint(3, len(tok), (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    times: dict[str, list[float]] = {name: [] for name in ms}
    extras: dict[str, dict] = {}
    with install(model) as hooks:
        for name, m in ms.items():  # warm-up, once each
            prefill(model, hooks, ids, m, seed=0, keep_ratio=args.keep_ratio)
        for rep in range(args.repeats):
            order = list(ms) if rep % 2 == 0 else list(reversed(ms))  # alternate the order
            for name in order:
                _sync(model.device)
                t0 = time.perf_counter()
                pre = prefill(model, hooks, ids, ms[name], seed=0, keep_ratio=args.keep_ratio)
                _sync(model.device)
                times[name].append(time.perf_counter() - t0)
                extras[name] = pre.extras
                del pre
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "model": model_desc, "n_layers": n_layers, "context": args.context, "keep_ratio": args.keep_ratio,
        "repeats": args.repeats, "median_s": med, "ratio_to_full": {n: med[n] / med["full"] for n in med},
        "asl": extras["asl"], "asl_fixed": extras["asl_fixed"], "machine": machine(),
    }
    print(f"model: {model_desc}, {n_layers} layers; context {args.context}; keep_ratio {args.keep_ratio}; "
          f"{args.repeats} repeats, alternating")
    for name in ms:
        note = ""
        if name.startswith("asl"):
            e = extras[name]
            note = f"  (selection layer {e['asl_layer']}, kept {e['asl_kept_tokens']} tokens, " \
                   f"skipped {e['asl_skipped']:.1%} of layer-token work)"
        print(f"  {name:10s} median {med[name] * 1000:8.1f} ms   x{med[name] / med['full']:.3f} of full{note}")
    print(f"ASL / full prefill: {med['asl'] / med['full']:.3f}; ASL at its start layer / full: "
          f"{med['asl_fixed'] / med['full']:.3f}")
    print("machine:", json.dumps(result["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
