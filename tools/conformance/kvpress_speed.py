"""Time NVIDIA kvpress's own pipeline on a SnapKV ratio sweep. Runs in kvpress's environment, not kvbench's:

    .peers/kvpress-venv/bin/python tools/conformance/kvpress_speed.py --model DIR --ids IDS.json \
        [--ratios 0.1 0.25 0.5 0.75 0.9] [--max-new-tokens 16] [--repeats 3] [--threads 1] [--serve]
        [--device cpu|cuda] [--dtype float32|bfloat16|float16]

``DIR`` is a saved model (+ tokenizer) directory; ``IDS.json`` = ``{"context": [ids], "question": [ids]}``.
``benchmarks/vs_kvpress.py`` writes both and calls this script, so the two sides load the same weights and
get the same ids.

What is timed, per compression ratio: kvpress's ``kv-press-text-generation`` pipeline with
``SnapKVPress(compression_ratio=cr)`` (its defaults: window 64, kernel 5), query-agnostic (the pipeline's
default: the press wraps the prefill of the context, the question is fed after it on the compressed cache),
then greedy decoding of exactly ``max_new_tokens`` tokens (the model's ``eos_token_id`` is unset so no run
stops early). The pipeline is called through ``Pipeline.forward`` on the already tokenised ids -- i.e. the
whole pipeline minus ``preprocess`` (tokenisation of a string) and ``postprocess`` (a dict around the
answer) -- because both sides must get identical ids; those two steps cost microseconds. kvpress, like any
per-ratio press, prefills the context once per ratio: a 5-ratio sweep is 5 runs.

Prints one JSON object: medians over ``repeats`` (after one warm-up sweep) of each ratio's run and of the
whole sweep (sum of the 5 runs of one repeat), wall-clock and process CPU time, the answers, versions and
thread count.

``--serve``: after loading and the warm-up, print ``{"ready": ...}`` and then run one sweep per ``sweep`` line
read on stdin, printing one JSON line per sweep (``quit`` or end of input stops). ``benchmarks/vs_kvpress.py``
uses it to interleave kvpress's sweeps with ours, so both see the same machine load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help="one sweep per 'sweep' line on stdin (see above)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")

    torch.set_num_threads(args.threads)
    import kvpress
    import transformers
    from kvpress import SnapKVPress
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    with open(args.ids) as fh:
        ids = json.load(fh)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").to(args.device).eval()
    model.generation_config.eos_token_id = None  # every run decodes exactly max_new_tokens tokens
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=args.device)
    inputs = {"context_ids": torch.tensor([ids["context"]]), "questions_ids": [torch.tensor([ids["question"]])]}

    def run(cr: float) -> tuple[float, str]:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = pipe.forward(inputs, press=SnapKVPress(compression_ratio=cr), max_new_tokens=args.max_new_tokens)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        return elapsed, pipe.postprocess(out, single_question=True)["answer"]

    def sweep() -> dict:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cpu_start, per_ratio, answers = time.process_time(), {}, {}
        for cr in args.ratios:
            per_ratio[str(cr)], answers[str(cr)] = run(cr)
        return {"sweep_s": sum(per_ratio.values()), "sweep_cpu_s": time.process_time() - cpu_start,
                "per_ratio_s": per_ratio, "answers": answers,
                **({"cuda_peak_bytes": torch.cuda.max_memory_allocated()} if cuda else {})}

    info = {
        "kvpress_version": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "press": "SnapKVPress(window_size=64, kernel_size=5)",
        "context_tokens": len(ids["context"]),
        "question_tokens": len(ids["question"]),
        "max_new_tokens": args.max_new_tokens,
    }
    sweep()  # warm-up
    if args.serve:
        print(json.dumps({"ready": info}), flush=True)
        while sys.stdin.readline().strip() == "sweep":
            print(json.dumps(sweep()), flush=True)
        return
    results = [sweep() for _ in range(args.repeats)]
    print(json.dumps({
        **info,
        "repeats": args.repeats,
        "sweep_s": statistics.median(r["sweep_s"] for r in results),
        "sweep_s_all": [r["sweep_s"] for r in results],
        "sweep_cpu_s": statistics.median(r["sweep_cpu_s"] for r in results),
        "per_ratio_s": {str(cr): statistics.median(r["per_ratio_s"][str(cr)] for r in results) for cr in args.ratios},
        "answers": results[-1]["answers"],
    }))


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
