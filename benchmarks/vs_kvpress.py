"""Ours vs NVIDIA kvpress on the same model, input and SnapKV ratios (issue 10): prints kvpress_time / ours.

    python benchmarks/vs_kvpress.py [--context 4096] [--max-new-tokens 16] [--repeats 3] [--threads 1]
        [--kvpress-python .peers/kvpress-venv/bin/python] [--json out.json]

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
  are medians over ``--repeats`` sweeps after a warm-up sweep, model loading excluded.

The answers of both sides are compared per ratio (same kept entries and greedy decoding should give the same
text; a difference can only come from float-level ties). Target: kvpress_time / ours >= 3.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEEP_RATIOS = [0.9, 0.75, 0.5, 0.25, 0.1]


def machine(threads: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": threads, "device": "cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    try:
        info["load_average"] = [round(x, 2) for x in __import__("os").getloadavg()]
    except OSError:
        pass
    return info


def save_model(out_dir: Path) -> str:
    """Random-weight model (+ tokenizer) saved to ``out_dir``; returns a description."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from harness.models import REFERENCE_DIR, build_tiny

    torch.manual_seed(0)
    if (REFERENCE_DIR / "config.json").exists():
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
    return what


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
    from omegaconf import OmegaConf

    import methods

    base = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/method/_common.yaml"))
    own = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(ROOT / "conf/method/snapkv.yaml")).items()
           if k != "defaults"}
    return methods.build_method({**base, **own, "preset": "kvpress"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kvpress-python", default=str(ROOT / ".peers/kvpress-venv/bin/python"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.attention import install
    from harness.pipeline import run_sample

    with tempfile.TemporaryDirectory(prefix="kvbench-vs-kvpress-") as tmp:
        tmp_dir = Path(tmp)
        model_dir = tmp_dir / "model"
        what = save_model(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
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
        sweeps, outcomes = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            outcomes = ours()
            sweeps.append(time.perf_counter() - start)
        ours_s = statistics.median(sweeps)

        cmd = [args.kvpress_python, str(ROOT / "tools/conformance/kvpress_speed.py"), "--model", str(model_dir),
               "--ids", str(ids_path), "--ratios", *[str(round(1 - r, 6)) for r in KEEP_RATIOS],
               "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"kvpress run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])

    same = {str(r): outcomes[i].prediction == theirs["answers"][str(round(1 - r, 6))]
            for i, r in enumerate(KEEP_RATIOS)}
    result = {
        "machine": machine(args.threads),
        "model": what,
        "context_tokens": len(ctx),
        "question_tokens": len(question),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "method": "snapkv preset=kvpress (window 64, kernel 5, avg), query-agnostic",
        "keep_ratios": KEEP_RATIOS,
        "ours_sweep_s": ours_s,
        "ours_sweep_s_all": sweeps,
        "ours_prefill_s": outcomes[0].prefill_s,
        "ours_compress_s": [o.compress_s for o in outcomes],
        "ours_decode_s": [o.decode_s for o in outcomes],
        "kvpress": {k: v for k, v in theirs.items() if k != "answers"},
        "same_answer_per_keep_ratio": same,
        "kvpress_time / ours": theirs["sweep_s"] / ours_s,
    }
    print(json.dumps(result, indent=2))
    print(f"kvpress_time / ours = {theirs['sweep_s']:.3f} s / {ours_s:.3f} s = {theirs['sweep_s'] / ours_s:.2f}x "
          f"(target >= 3x; {len(ctx)}-token context, {args.max_new_tokens} new tokens, 5 ratios, "
          f"{args.threads} thread(s), {result['machine'].get('cpu', '?')})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
