"""Every GPU figure of issue 27 in one run (under 10 minutes on one H200): Llama-3.1-8B's architecture with random
weights in bf16 (``speed.LLAMA_8B`` / ``speed.load_llama_8b``; what a step costs does not depend on the weights).

Parts, in this order (each reuses the one implementation of its measurement, imported from its benchmark):

* ``ragged``: ragged / uniform decode step at ``--context`` with a quarter kept per head on average
  (``ragged_decode.measure``, the 200/312 and 64/448 splits scaled to that budget, 8 KV heads);
* ``batching``: batch 8 / batch 1 samples per second of the real runner at ``--batch-context``, SnapKV at keep
  0.25 and full, same predictions and scores checked (``batching.measure``);
* ``speed``: harness full cache / bare ``model.generate`` and 5-ratio SnapKV sweep / single ratio at
  ``--context`` (``speed.measure``);
* ``memory``: CUDA peak allocated memory above the weights of one sample (prefill, cut, decode) per method at
  keep 0.25 (full at 1.0), beside the harness's own ``peak_mem_bytes`` and the kept cache's bytes;
* ``kvpress``: kvpress 5-ratio SnapKV sweep / ours (``vs_kvpress.py`` in a subprocess, with kvpress's own venv,
  ``.peers/kvpress-venv``, or this Python if it imports kvpress); "kvpress not installed" when neither does.

A part that fails prints its error and the others still run; a part is skipped once less than its usual time is
left of ``--budget-s`` (9 minutes by default, counted from the start, model building included). The results are
printed part by part and rewritten to ``--out`` (JSON) after each part, so a run stopped early keeps what it had.

    python benchmarks/gpu_figures.py --out $OUT/gpu_figures.json              # on the GPU machine
    python benchmarks/gpu_figures.py --smoke --out /tmp/gpu_figures.json     # CPU check of the whole script, < 2 min

``--smoke``: on CPU, a 2-layer Llama of the same shape family (hidden 256, 16 query / 8 KV heads of 16, the 8B's
vocabulary), one torch thread, 512-token prompts, one repeat, short decodes, kvpress on its reference-architecture
model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import batching  # noqa: E402
import ragged_decode  # noqa: E402
import speed  # noqa: E402
from machine import machine  # noqa: E402

MEMORY_METHODS = ["full", "snapkv", "streaming_llm", "h2o", "expected_attention"]
KEEP = 0.25
# The smoke run's model: Llama-3.1-8B's family and vocabulary, small enough for a shared CPU.
SMOKE_ARCH = dict(hidden_size=256, intermediate_size=512, num_attention_heads=16, num_key_value_heads=8, head_dim=16)
# Sizes of each part: the GPU run, and the smoke run on CPU. ``reserve_s`` is the time a part is not started
# without (about what it took on an H200; the smoke values are what it takes on 2 shared CPU cores).
GPU = dict(context=32768, batch_context=8192, ragged=dict(steps=64, repeats=5), batching=dict(n_samples=8,
           max_new_tokens=32, repeats=2), speed=dict(repeats=3, new_tokens=8), memory=dict(new_tokens=8),
           kvpress=dict(repeats=2, max_new_tokens=16),
           reserve_s=dict(ragged=40, batching=90, speed=90, memory=40, kvpress=150), budget_s=540)
SMOKE = dict(context=512, batch_context=512, ragged=dict(steps=8, repeats=1), batching=dict(n_samples=4,
             max_new_tokens=8, repeats=1), speed=dict(repeats=1, new_tokens=4), memory=dict(new_tokens=4),
             kvpress=dict(repeats=1, max_new_tokens=4),
             reserve_s=dict(ragged=5, batching=15, speed=15, memory=10, kvpress=40), budget_s=110)


def peak_memory(model, tok, context: int, names: list[str] = MEMORY_METHODS, keep: float = KEEP,
                new_tokens: int = 8) -> dict:
    """Per method, one sample at ``context`` (query-agnostic: prefill, cut at ``keep``, question, decode): the CUDA
    peak allocated above what was allocated before (the weights), the harness's ``peak_mem_bytes`` and the kept
    cache's bytes, in MiB."""
    import methods
    from harness.attention import install
    from harness.pipeline import run_sample

    ctx, q = speed.prompt(tok, context)
    cuda = model.device.type == "cuda"
    out = {}
    for name in names:
        method = methods.load(name)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with install(model) as hooks:
            outcome = run_sample(model, tok, hooks, method, ctx, q, [1.0 if name == "full" else keep], False,
                                 new_tokens, [], 0)[0]
        row = {"keep_ratio": outcome.keep_ratio, "kv_mib": outcome.kv_bytes / 2**20,
               "harness_peak_mem_mib": outcome.peak_mem_bytes / 2**20}
        if cuda:
            torch.cuda.synchronize()
            row["cuda_peak_over_weights_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        out[name] = row
    return {"context_tokens": len(ctx) + len(q), "new_tokens": new_tokens, "methods": out}


def kvpress_python() -> str | None:
    """A Python that imports kvpress: this one, else kvpress's own venv (``tools/peers/kvpress-env.sh``)."""
    import importlib.util

    if importlib.util.find_spec("kvpress") is not None:
        return sys.executable
    venv = ROOT / ".peers/kvpress-venv/bin/python"
    if venv.exists() and subprocess.run([str(venv), "-c", "import kvpress"], capture_output=True).returncode == 0:
        return str(venv)
    return None


def vs_kvpress(python: str, smoke: bool, context: int, repeats: int, max_new_tokens: int, timeout_s: float) -> dict:
    """``benchmarks/vs_kvpress.py`` in a subprocess (it runs kvpress's side in kvpress's venv); its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        model = ["--model", "reference", "--device", "cpu"] if smoke else ["--model", "llama-8b", "--device", "cuda"]
        cmd = [sys.executable, str(ROOT / "benchmarks/vs_kvpress.py"), *model, "--context", str(context),
               "--repeats", str(repeats), "--max-new-tokens", str(max_new_tokens), "--kvpress-python", python,
               "--json", out.name]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode:
            raise RuntimeError(f"vs_kvpress.py exited {done.returncode}: {done.stderr[-2000:]}")
        result = json.loads(Path(out.name).read_text())
    pairs = result["kvpress_time / ours per interleaved pair"]
    return {"ratio": result["kvpress_time / ours"], "ratio_range": [min(pairs), max(pairs)],
            "ours_sweep_s": result["ours_sweep_s"], "kvpress_sweep_s": result["kvpress"]["sweep_s"],
            "same_answer_per_keep_ratio": result["same_answer_per_keep_ratio"],
            "cuda_peak_gib": result.get("cuda_peak_gib"), "model": result["model"],
            "context_tokens": result["context_tokens"], "repeats": result["repeats"]}


def brief(name: str, result: dict) -> str:
    """The ratios of one part on one line."""
    if "error" in result or "skipped" in result:
        return f"{name}: {result.get('error') or result['skipped']}"
    if name == "ragged":
        return f"{name}: " + ragged_decode.summary(result)
    if name == "batching":
        return f"{name}: " + batching.summary(result)
    if name == "speed":
        return f"{name}: " + ", ".join(f"{k} = {v:.2f}x ({result['ratio_range'][k][0]:.2f}-"
                                       f"{result['ratio_range'][k][1]:.2f})" for k, v in result["ratios"].items()) + \
            f"; {result['context_tokens']}-token prompt, {result['new_tokens']} new tokens"
    if name == "memory":
        return f"{name} (MiB above the weights, {result['context_tokens']} tokens): " + ", ".join(
            f"{m} {r.get('cuda_peak_over_weights_mib', r['harness_peak_mem_mib']):.0f}"
            for m, r in result["methods"].items())
    if name == "kvpress":
        return f"{name}: kvpress 5-ratio SnapKV sweep / ours = {result['ratio']:.2f}x " \
               f"({result['ratio_range'][0]:.2f}-{result['ratio_range'][1]:.2f})"
    return f"{name}: {result}"


def main() -> None:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file written after every part (e.g. $OUT/gpu_figures.json)")
    parser.add_argument("--smoke", action="store_true", help="a short CPU run of the whole script (< 2 minutes)")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget (default 540; smoke 110)")
    parser.add_argument("--context", type=int, default=None, help="ragged, speed, memory, kvpress (default 32768)")
    parser.add_argument("--batch-context", type=int, default=None, help="batching's samples (default 8192)")
    parser.add_argument("--parts", nargs="+", default=None, choices=["ragged", "batching", "speed", "memory",
                                                                     "kvpress"], help="only these parts")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else GPU
    budget = args.budget_s or sizes["budget_s"]
    context, batch_context = args.context or sizes["context"], args.batch_context or sizes["batch_context"]
    for key, value in (("--context", context), ("--batch-context", batch_context), ("--budget-s", budget)):
        if value <= 0:
            parser.error(f"{key} {value} must be > 0")
    if args.smoke:  # one thread: on a CPU shared with other work, two contend badly and the check only checks
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device here: run on the GPU machine, or --smoke for the CPU check")
    if args.smoke:
        model, tok = speed.load_llama_8b(device, 2, **SMOKE_ARCH)
        label = f"Llama-3.1-8B family, random weights, 2 layers, {SMOKE_ARCH} (smoke)"
    else:
        model, tok = speed.load_llama_8b(device)
        label = "Llama-3.1-8B architecture, random weights, bf16"
    report = {"model": label, "machine": machine(), "context": context, "batch_context": batch_context,
              "budget_s": budget, "parts": {}}
    print(f"{label} on {report['machine']['device']}, built in {time.perf_counter() - start:.0f} s", flush=True)
    budget_tokens = context // 4  # the ragged part keeps a quarter per head on average, as the other parts
    parts = {
        "ragged": lambda: ragged_decode.measure(model, tok, context, budget_tokens,
                                                ragged_decode.scaled_splits(budget_tokens), **sizes["ragged"]),
        "batching": lambda: batching.measure(model, tok, batch_context, **sizes["batching"]),
        "speed": lambda: speed.measure(model, tok, label, context, **sizes["speed"]),
        "memory": lambda: peak_memory(model, tok, context, new_tokens=sizes["memory"]["new_tokens"]),
        "kvpress": None,
    }
    for name, run in parts.items():
        if args.parts and name not in args.parts:
            continue
        left = budget - (time.perf_counter() - start)
        part_start = time.perf_counter()
        if left < sizes["reserve_s"][name]:
            result = {"skipped": f"skipped: {left:.0f} s left of the {budget:.0f} s budget, "
                                 f"{sizes['reserve_s'][name]} s needed"}
        else:
            try:
                if name == "kvpress":
                    python = kvpress_python()
                    if python is None:
                        result = {"skipped": "kvpress not installed"}
                    else:
                        result = vs_kvpress(python, args.smoke, context, timeout_s=max(left - 5, 1),
                                            **sizes["kvpress"])
                else:
                    result = run()
            except Exception as err:  # noqa: BLE001 - one part's failure must not lose the others
                traceback.print_exc()
                result = {"error": f"failed: {type(err).__name__}: {str(err)[:500]}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        result["part_s"] = round(time.perf_counter() - part_start, 1)
        report["parts"][name] = result
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        print(brief(name, result) + f" [{result['part_s']} s]", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"done in {time.perf_counter() - start:.0f} s" + (f"; {args.out} written" if args.out else ""))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
