"""Ours vs NVIDIA kvpress on the same model, input and SnapKV ratios (issue 10): prints kvpress_time / ours.

    python benchmarks/vs_kvpress.py [--context 4096] [--max-new-tokens 16] [--repeats 3] [--threads 1]
        [--kvpress-python .peers/kvpress-venv/bin/python] [--json out.json]
    python benchmarks/vs_kvpress.py --model llama-8b --context 32768 --device cuda   # the GPU variant

* GPU variant (``--model llama-8b``): Llama-3.1-8B's architecture with random weights (as
  ``benchmarks/speed.py``), bf16 on CUDA, saved once and loaded by both sides; ``--layers N`` shortens it (a
  CPU smoke run: ``--model llama-8b --layers 1 --context 1024 --device cpu``). On CUDA both sides also report
  their peak allocated memory. kvpress's venv must exist on that machine: ``tools/peers/kvpress-env.sh``
  installs the CUDA torch build there when ``nvidia-smi`` works.

* Model: random weights with the reference model's architecture (``harness/reference/checkpoint``'s config
  and tokenizer) when the checkpoint exists, else a random 4-layer Llama, hidden 192 (6 query / 2 KV heads,
  head_dim 32) with the byte tokenizer. Saved to a temporary directory that both sides load (float32, sdpa).
* Input: a ~``--context``-token RULER NIAH prompt (random ids if the task is unavailable); context and
  question ids are written to the same directory, so both sides get identical ids.
* Ours: ``harness.pipeline.run_sample`` with keep ratios [0.9, 0.75, 0.5, 0.25, 0.1], SnapKV with
  ``preset=kvpress`` (window 64, kernel 5, avg-pool), query-agnostic: one prefill + scoring serves the 5
  ratios, each ratio prunes a copy of the cache, feeds the question and decodes.
* kvpress: ``tools/conformance/kvpress_speed.py`` in kvpress's own venv (subprocess): its pipeline with
  ``SnapKVPress`` at compression ratios [0.1, 0.25, 0.5, 0.75, 0.9] = the same 5 budgets, 5 runs (kvpress
  prefills once per ratio).
* Both decode exactly ``--max-new-tokens`` tokens greedily (EOS unset), on the same number of threads; times
  are medians over ``--repeats`` sweeps after a warm-up sweep each, model loading excluded. kvpress runs as a
  server (``--serve``) so that its sweeps alternate with ours (who goes first alternates too): on a shared
  machine both sides then see the same load. Process CPU time is reported beside wall-clock time.

The answers of both sides are compared per ratio (same kept entries and greedy decoding should give the same
text; a difference can only come from float-level ties). Target: kvpress_time / ours >= 3.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine  # noqa: E402

KEEP_RATIOS = [0.9, 0.75, 0.5, 0.25, 0.1]


def save_model(out_dir: Path, model_name: str = "reference", layers: int | None = None,
               device: torch.device = torch.device("cpu")) -> tuple[str, torch.dtype]:
    """Random-weight model (+ tokenizer) saved to ``out_dir``; returns a description and its dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from harness.models import REFERENCE_DIR, build_tiny

    torch.manual_seed(0)
    if model_name == "llama-8b":
        from speed import load_llama_8b

        # built directly on the benchmark's device (bf16 on CUDA, float32 on CPU, as speed.py): the random
        # initialisation of 8B parameters is slow on a CPU
        model, tokenizer = load_llama_8b(device, layers)
        what = "Llama-3.1-8B architecture, random weights" + (f", {layers} layers" if layers else "")
    elif (REFERENCE_DIR / "config.json").exists():
        config = AutoConfig.from_pretrained(REFERENCE_DIR)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
        what = f"reference architecture ({config.model_type}, {config.num_hidden_layers} layers, hidden " \
               f"{config.hidden_size}), random weights"
    else:
        model, tokenizer = build_tiny("llama", hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=6, num_key_value_heads=2, head_dim=32)
        what = "reference checkpoint absent: random Llama, 4 layers, hidden 192, 6/2 heads, head_dim 32"
    model.generation_config.eos_token_id = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    dtype = model.dtype
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return what, dtype


def prompt_ids(tokenizer, context: int) -> tuple[list[int], list[int]]:
    try:
        import tasks
        from tasks.base import PromptEncoder

        task = tasks.get_task("ruler/niah_single_1")
        encoder = PromptEncoder(tokenizer)
        return encoder.encode_sample(task.samples(encoder, context, 1, 0)[0])
    except Exception as exc:  # noqa: BLE001 - any task problem: fall back to random ids
        print(f"ruler/niah_single_1 unavailable ({exc}); using random ids", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, len(tokenizer), (context,), generator=g).tolist()
        return ids[:-16], ids[-16:]


def snapkv_kvpress():
    import methods

    return methods.load("snapkv", preset="kvpress")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kvpress-python", default=str(ROOT / ".peers/kvpress-venv/bin/python"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default="reference", help="reference (its architecture) or llama-8b")
    parser.add_argument("--layers", type=int, default=None, help="llama-8b only: fewer layers (a CPU smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    if args.model not in ("reference", "llama-8b"):
        parser.error(f"--model {args.model!r} is not known; allowed: reference, llama-8b")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; allowed: cpu")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.attention import install
    from harness.pipeline import run_sample

    with tempfile.TemporaryDirectory(prefix="kvbench-vs-kvpress-") as tmp:
        tmp_dir = Path(tmp)
        model_dir = tmp_dir / "model"
        what, dtype = save_model(model_dir, args.model, args.layers, device)
        dtype_name = str(dtype).removeprefix("torch.")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model.generation_config.eos_token_id = None  # exactly max_new_tokens tokens on both sides
        tokenizer.eos_token_id = None
        ctx, question = prompt_ids(tokenizer, args.context)
        ids_path = tmp_dir / "ids.json"
        ids_path.write_text(json.dumps({"context": ctx, "question": question}))
        method = snapkv_kvpress()

        def ours():
            with install(model) as hooks:
                return run_sample(model, tokenizer, hooks, method, ctx, question, KEEP_RATIOS, False,
                                  args.max_new_tokens, [], 0)

        ours()  # warm-up
        cmd = [args.kvpress_python, str(ROOT / "tools/conformance/kvpress_speed.py"), "--model", str(model_dir),
               "--ids", str(ids_path), "--ratios", *[str(round(1 - r, 6)) for r in KEEP_RATIOS],
               "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--serve",
               "--device", device.type, "--dtype", dtype_name]
        with open(tmp_dir / "kvpress.stderr", "w+") as err, subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT
        ) as proc:

            def kvpress_line() -> dict:
                line = proc.stdout.readline()
                if not line:
                    err.seek(0)
                    sys.exit(f"kvpress run failed ({' '.join(cmd)}):\n{err.read()[-3000:]}")
                return json.loads(line)

            def kvpress_sweep() -> dict:
                proc.stdin.write("sweep\n")
                proc.stdin.flush()
                return kvpress_line()

            peak = [0]  # ours' CUDA peak over the sweeps

            def ours_sweep():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                start, cpu = time.perf_counter(), time.process_time()
                result = ours()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peak[0] = max(peak[0], torch.cuda.max_memory_allocated(device))
                return time.perf_counter() - start, time.process_time() - cpu, result

            info = kvpress_line()["ready"]  # loaded and warmed up
            mine, theirs = [], []
            for i in range(args.repeats):  # interleaved, alternating who goes first: both see the same load
                if i % 2:
                    theirs.append(kvpress_sweep())
                    mine.append(ours_sweep())
                else:
                    mine.append(ours_sweep())
                    theirs.append(kvpress_sweep())
            proc.stdin.write("quit\n")
            proc.stdin.flush()
        outcomes = mine[-1][2]
        ours_s = statistics.median(m[0] for m in mine)
        kvpress_s = statistics.median(t["sweep_s"] for t in theirs)
        ours_cpu = statistics.median(m[1] for m in mine)
        kvpress_cpu = statistics.median(t["sweep_cpu_s"] for t in theirs)
        pair_ratios = [t["sweep_s"] / m[0] for m, t in zip(mine, theirs)]

    same = {str(r): outcomes[i].prediction == theirs[-1]["answers"][str(round(1 - r, 6))]
            for i, r in enumerate(KEEP_RATIOS)}
    result = {
        "machine": {**machine(), "threads": args.threads},
        "device": device.type,
        "dtype": dtype_name,
        "model": what,
        "context_tokens": len(ctx),
        "question_tokens": len(question),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "method": "snapkv preset=kvpress (window 64, kernel 5, avg), query-agnostic",
        "keep_ratios": KEEP_RATIOS,
        "ours_sweep_s": ours_s,
        "ours_sweep_s_all": [m[0] for m in mine],
        "ours_sweep_cpu_s": ours_cpu,
        "ours_last_sweep": {"prefill_s": outcomes[0].prefill_s, "compress_s": [o.compress_s for o in outcomes],
                            "decode_s": [o.decode_s for o in outcomes]},
        "kvpress": {**info, "sweep_s": kvpress_s, "sweep_s_all": [t["sweep_s"] for t in theirs],
                    "sweep_cpu_s": kvpress_cpu,
                    "per_ratio_s": {cr: statistics.median(t["per_ratio_s"][cr] for t in theirs)
                                    for cr in theirs[0]["per_ratio_s"]}},
        "same_answer_per_keep_ratio": same,
        "kvpress_time / ours per interleaved pair": pair_ratios,
        "kvpress_cpu / ours_cpu": kvpress_cpu / ours_cpu,
        "kvpress_time / ours": kvpress_s / ours_s,
    }
    if device.type == "cuda":  # weights included on both sides (each process holds its own copy)
        result["cuda_peak_gib"] = {"ours": peak[0] / 2**30,
                                   "kvpress": max(t.get("cuda_peak_bytes", 0) for t in theirs) / 2**30}
    print(json.dumps(result, indent=2))
    print(f"kvpress_time / ours = {kvpress_s:.3f} s / {ours_s:.3f} s = {kvpress_s / ours_s:.2f}x wall "
          f"({kvpress_cpu / ours_cpu:.2f}x CPU time; target >= 3x; {len(ctx)}-token context, "
          f"{args.max_new_tokens} new tokens, 5 ratios, {device.type}, {args.threads} thread(s), "
          f"{result['machine'].get('cpu', '?')}, load {result['machine'].get('load_average', '?')})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
