"""Speed of a sweep, measured side by side in one process (medians over repeats, alternating order).

    python benchmarks/speed.py [--model reference|tiny|llama-8b] [--context 4096] [--repeats 3] [--json out.json]
    python benchmarks/speed.py --model llama-8b --context 32768 --repeats 3   # the GPU variant (bf16 on CUDA)

Prints, with the machine (each ratio: the median over repeats of the ratio of two variants run back to back):
  * sweep_5_ratios / single_ratio: one SnapKV prefill serving 5 keep ratios vs one ratio (target <= 1.3x);
  * separate_5 / sweep_5_ratios: 5 separate runs (what kvpress does) vs our shared sweep;
  * harness_full / bare_generate: our full-cache run vs transformers' model.generate on the same input
    (target <= 1.05x).
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

RATIOS = [0.1, 0.25, 0.5, 0.75, 0.9]
# Llama-3.1-8B-Instruct's architecture (its config.json) with random weights: what prefill, scoring, selection
# and decoding cost does not depend on the weights, and no weights can be downloaded here. The reference model's
# tokenizer writes the RULER prompt (ids stay far below the vocabulary size).
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False)


def load_llama_8b(device: torch.device, layers: int | None = None, **shrink):
    """Random-weight Llama-3.1-8B (bf16 on CUDA, float32 on CPU), built directly on ``device``; ``layers``
    shortens it and ``shrink`` overrides other keys of ``LLAMA_8B`` (CPU smoke runs of the GPU variant)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from harness.models import REFERENCE_DIR

    arch = dict(LLAMA_8B, num_hidden_layers=layers or LLAMA_8B["num_hidden_layers"], **shrink)
    config = LlamaConfig(**arch)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval(), PreTrainedTokenizerFast.from_pretrained(REFERENCE_DIR)


def load(model_name: str):
    from omegaconf import OmegaConf

    from harness.models import REFERENCE_DIR, build_tiny, load_model

    if model_name == "reference" and (REFERENCE_DIR / "config.json").exists():
        return load_model(OmegaConf.create({"name": "reference", "path": None}))
    if model_name == "reference":
        print("reference checkpoint absent: random weights with its architecture (speed does not depend on "
              "the weights)", file=sys.stderr)
        from harness.reference.model import REFERENCE_ARCH

        arch = {k: v for k, v in REFERENCE_ARCH.items() if k not in ("initializer_range",)}
        return build_tiny("llama", **arch)
    return build_tiny("llama", hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=32)


def prompt(tokenizer, context: int) -> tuple[list[int], list[int]]:
    import tasks
    from tasks.base import PromptEncoder

    try:
        task = tasks.get_task("ruler/niah_single_1")
        sample = task.samples(PromptEncoder(tokenizer), context, 1, 0)[0]
        return PromptEncoder(tokenizer).encode_sample(sample)
    except KeyError:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, len(tokenizer), (context,), generator=g).tolist()
        return ids[:-16], ids[-16:]


def method(name: str):
    import methods

    return methods.load(name)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, tok, label: str, context: int = 4096, repeats: int = 11, new_tokens: int = 8) -> dict:
    """The variants of the module docstring timed on ``model`` (per repeat back to back, alternating order) and
    their per-repeat ratios; on CUDA also each variant's peak allocated memory (weights included)."""
    from harness.attention import install
    from harness.pipeline import run_sample

    device = model.device
    ctx, q = prompt(tok, context)
    snap, full = method("snapkv"), method("full")
    n = new_tokens
    # every variant decodes exactly n tokens (both EOS ids come back at the end)
    model_eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    tok_eos, tok.eos_token_id = tok.eos_token_id, None

    def ours(m, ratios):
        with install(model) as hooks:
            run_sample(model, tok, hooks, m, ctx, q, ratios, True, n, [], 0)

    def bare_generate():
        # An explicit all-ones mask and the tokenizer's own pad id: with pad_token_id equal to the BOS id,
        # generate would take the BOS for padding and fall back to a slower masked attention.
        ids = torch.tensor([ctx + q], device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=tok.pad_token_id)

    variants = {
        "single_ratio": lambda: ours(snap, [0.25]),
        "sweep_5_ratios": lambda: ours(snap, RATIOS),
        "separate_5": lambda: [ours(snap, [r]) for r in RATIOS],
        "harness_full": lambda: ours(full, [1.0]),
        "bare_generate": bare_generate,
    }
    for fn in variants.values():  # warm-up
        fn()
    times = {k: [] for k in variants}
    peak = {}
    for rep in range(repeats):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))  # no variant always goes first
        for name in order:
            fn = variants[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(timed(fn))
            if device.type == "cuda":  # the memory a variant needs at its peak, weights included
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
    tok.eos_token_id = tok_eos
    model.generation_config.eos_token_id = model_eos
    med = {k: statistics.median(v) for k, v in times.items()}
    # Each ratio is the median of its per-repeat ratios: the two variants of a pair ran back to back, so a change
    # in machine load between repeats cancels out (a ratio of two medians would mix different repeats).
    pairs = {"sweep_5_ratios / single_ratio": ("sweep_5_ratios", "single_ratio"),
             "separate_5 / sweep_5_ratios": ("separate_5", "sweep_5_ratios"),
             "harness_full / bare_generate": ("harness_full", "bare_generate")}
    per_repeat = {name: [x / y for x, y in zip(times[a], times[b])] for name, (a, b) in pairs.items()}
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": label,
        "context_tokens": len(ctx) + len(q),
        "new_tokens": n,
        "median_s": med,
        **({"cuda_peak_gib": {k: v / 2**30 for k, v in peak.items()}} if peak else {}),
        "repeats": repeats,
        "ratios": {name: statistics.median(r) for name, r in per_repeat.items()},
        "ratio_range": {name: [min(r), max(r)] for name, r in per_repeat.items()},
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--layers", type=int, default=None, help="llama-8b only: fewer layers (a CPU smoke run)")
    args = parser.parse_args()
    if args.model not in ("reference", "tiny", "llama-8b"):
        parser.error(f"--model {args.model!r} is not known; allowed: reference, tiny, llama-8b")

    from harness.models import REFERENCE_DIR

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model == "llama-8b":
        model, tok = load_llama_8b(device, args.layers)
        label = "Llama-3.1-8B architecture, random weights" + (f", {args.layers} layers" if args.layers else "")
    else:
        model, tok = load(args.model)
        model = model.to(device)
        label = args.model if args.model != "reference" or (REFERENCE_DIR / "config.json").exists() else \
            "reference architecture, random weights (checkpoint absent)"
    result = measure(model, tok, label, args.context, args.repeats, args.new_tokens)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
