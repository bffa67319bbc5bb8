"""Prefill time and peak memory of the layer-wise methods vs a full prefill, side by side in one process (medians over
alternating repeats).

    python benchmarks/asl_prefill.py [--model reference|tiny] [--task ruler/niah_single_1] [--samples 3]
        [--context 4096] [--keep-ratio 0.1] [--repeats 5] [--memory-repeats 3] [--asl-threshold 0.3] [--json out.json]

Prompts: the contexts of the first ``--samples`` samples of ``--task`` (seed 0: the sweep's own samples; the
prefill is query-agnostic, as in the sweep), or ``--task random`` for random token ids. Per prompt, times the
whole prefill call (``harness.pipeline.prefill``: forward + scoring) of:
  * full: no method (plain causal prefill through the harness);
  * snapkv: the same full-length prefill plus SnapKV's scoring (what ASL costs when no layer qualifies);
  * asl: ASL with its defaults (adaptive layer: the paper's threshold and depth-scaled start / look-back);
  * asl_fixed: ASL forced to select at its start layer, the largest saving ASL's rule can give;
  * fastkv, gemfilter, pyramidinfer: each with its config's defaults (FastKV's TSP layer, GemFilter's filter
    layer and second prefill, PyramidInfer's per-layer shrinking).
A layer-wise method this checkout does not have (no ``conf/method/<name>.yaml``) is skipped with a note.

Each method's prefill runs back to back with a full prefill of the same prompt (full first on even repeats, second
on odd ones), so each ratio to full is the median over (repeat, prompt) pairs of two runs made seconds apart: a
machine shared with other jobs changes speed from minute to minute. Per method: the total over the prompts of the
per-prompt median wall time and CPU time of this process (``time.process_time``), those paired ratios to full, and
the peak memory of the prefill call over what was allocated before it (median over repeats, the largest over
prompts) and its ratio to full. Peak memory: CUDA's peak allocated bytes on GPU; on CPU the kernel's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs before each call), measured side by side in a child
process whose glibc returns freed large blocks to the OS (``MALLOC_MMAP_THRESHOLD_=65536``) so that RSS follows the
live tensors (not in the timing process: that setting slows every large allocation, ``--memory-repeats`` repeats
there).
GemFilter's filter pass is also timed alone (its share of a full prefill is about filter_layer / n_layers).
Prints each prompt's selection layer and the machine.
The reference checkpoint (harness/reference/checkpoint) is used when present, else a random 8-layer model
of the reference's width (said so on stderr and in the output).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402

LAYERWISE = ("asl", "fastkv", "gemfilter", "pyramidinfer")  # benchmarked when the checkout has them
MMAP_THRESHOLD = "65536"


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


def methods_under_test(asl_overrides: dict) -> tuple[dict, list[str]]:
    """The methods by row name, and a note for each layer-wise method this checkout lacks."""
    import methods

    available = set(methods.config_names())
    ms = {"full": methods.load("full"), "snapkv": methods.load("snapkv")}
    notes = []
    for name in LAYERWISE:
        if name not in available:
            notes.append(f"{name}: skipped (no conf/method/{name}.yaml in this checkout)")
            continue
        ms[name] = methods.load(name, **(asl_overrides if name == "asl" else {}))
        if name == "asl":
            ms["asl_fixed"] = methods.load("asl")
    return ms, notes


class PeakMemory:
    """Peak bytes allocated during a call over those allocated at its start (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        return int(self._status("VmHWM") - self.base)


def _selection_note(name: str, extras: list[dict]) -> str:
    key = {"asl": "asl_layer", "asl_fixed": "asl_layer", "fastkv": "fastkv_layer",
           "gemfilter": "gemfilter_layer"}.get(name)
    if key is None or not extras or key not in extras[0]:
        return ""
    layers = [e[key] for e in extras]
    if name == "gemfilter":
        return f"  (filter layer {layers[0]}, {[e['gemfilter_selected'] for e in extras]} tokens re-prefilled)"
    return f"  (selection layer per prompt {layers}; -1 = none)"


def measure(model, hooks, ms: dict, prompts: list[list[int]], keep_ratio: float, repeats: int,
            memory: PeakMemory | None) -> dict:
    """Each method's prefill of each prompt beside a full prefill of the same prompt, run back to back (full first
    on even repeats, second on odd ones; the methods in alternating order), ``repeats`` times after one warm-up
    each. Per method per prompt: the times, the CPU times, the peaks (when ``memory``), the ratios to the full
    prefill run beside it (wall and CPU; GemFilter's filter pass alone too) and the rows' extras."""
    from harness.pipeline import _sync, prefill

    keys = ("times", "cpu_times", "peaks", "paired", "cpu_paired")
    out = {key: {name: [[] for _ in prompts] for name in ms} for key in keys}
    out["extras"] = {name: [{} for _ in prompts] for name in ms}
    out["filter_paired"] = [[] for _ in prompts]

    def one(name: str, i: int) -> tuple[float, float]:
        if memory is not None:
            memory.start()
        _sync(model.device)
        t0, c0 = time.perf_counter(), time.process_time()
        pre = prefill(model, hooks, prompts[i], ms[name], seed=0, keep_ratio=keep_ratio)
        _sync(model.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out["times"][name][i].append(wall)
        out["cpu_times"][name][i].append(cpu)
        if memory is not None:
            out["peaks"][name][i].append(memory.peak())
        out["extras"][name][i] = pre.extras
        return wall, cpu

    for m in ms.values():  # warm-up, once each
        prefill(model, hooks, prompts[0], m, seed=0, keep_ratio=keep_ratio)
    others = [name for name in ms if name != "full"]
    for rep in range(repeats):
        for i in range(len(prompts)):
            for name in others if rep % 2 == 0 else others[::-1]:
                pair = ("full", name) if rep % 2 == 0 else (name, "full")
                got = {n: one(n, i) for n in pair}
                (wall, cpu), (full_wall, full_cpu) = got[name], got["full"]
                out["paired"][name][i].append(wall / full_wall)
                out["cpu_paired"][name][i].append(cpu / full_cpu)
                if name == "gemfilter":
                    out["filter_paired"][i].append(ms[name].scorer.filter_seconds / full_wall)
    return out


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles (how much the paired ratios spread on a shared machine)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def peaks_in_child(argv: list[str], repeats: int) -> dict[str, list[list[int]]]:
    """The CPU peaks, measured in a child process whose glibc returns freed large blocks to the OS (the same
    methods and prompts, side by side there). Not in this process: that allocator setting makes every large
    tensor a fresh mmap and slows the prefill several-fold, which would distort the times."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    cmd = [sys.executable, __file__, *argv, "--repeats", str(repeats), "--memory-child"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory child failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference", choices=["reference", "tiny"])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--task", default="ruler/niah_single_1", help="a task name, or random (random ids)")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=2, help="repeats of the CPU peak-memory child")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--asl-threshold", type=float, default=None,
                        help="ASL's variance-ratio threshold (default: the paper's 0.3, from conf/method/asl.yaml)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from harness.attention import install

    model, tok, model_desc = load(args.model)
    n_layers = model.config.num_hidden_layers
    ms, notes = methods_under_test({} if args.asl_threshold is None else {"threshold": args.asl_threshold})
    if "asl" in ms:
        ms["asl_fixed"].scorer.fixed_layer = ms["asl"].scorer.resolved(n_layers)[0]  # forced at the start layer
    prompts = prompt_contexts(tok, args.task, args.context, args.samples)
    on_cpu = model.device.type != "cuda"
    with install(model) as hooks:
        if args.memory_child:
            print(json.dumps(measure(model, hooks, ms, prompts, args.keep_ratio, args.repeats,
                                     PeakMemory(model.device))["peaks"]))
            return
        run = measure(model, hooks, ms, prompts, args.keep_ratio, args.repeats,
                      None if on_cpu else PeakMemory(model.device))
    shared = ["--model", args.model, "--context", str(args.context), "--task", args.task, "--samples",
              str(args.samples), "--keep-ratio", str(args.keep_ratio), "--threads", str(args.threads)]
    if args.asl_threshold is not None:
        shared += ["--asl-threshold", str(args.asl_threshold)]
    peaks = peaks_in_child(shared, args.memory_repeats) if on_cpu else run["peaks"]
    times, extras, filter_s = run["times"], run["extras"], run["filter_paired"]
    # per prompt: median over repeats; per method: the sum over prompts (the sweep's prefill time) and the largest
    # median peak over prompts (prompts of one length differ little)
    med = {name: sum(statistics.median(ts) for ts in per_prompt) for name, per_prompt in times.items()}
    cpu = {name: sum(statistics.median(ts) for ts in per_prompt) for name, per_prompt in run["cpu_times"].items()}
    # the ratio to the full prefill run beside it: the median over every (repeat, prompt) pair

    def paired(key: str) -> dict[str, float]:
        return {name: 1.0 if name == "full" else statistics.median(r for per_prompt in run[key][name]
                                                                   for r in per_prompt) for name in ms}

    wall_vs, cpu_vs = paired("paired"), paired("cpu_paired")
    spread = {name: quartiles([r for per_prompt in run["paired"][name] for r in per_prompt])
              for name in ms if name != "full"}
    peak = {name: max(statistics.median(ps) for ps in per_prompt) for name, per_prompt in peaks.items()}
    result = {
        "model": model_desc, "n_layers": n_layers, "task": args.task, "samples": len(prompts),
        "context": args.context, "prompt_tokens": [len(p) for p in prompts], "keep_ratio": args.keep_ratio,
        "repeats": args.repeats, "memory_repeats": args.memory_repeats if on_cpu else args.repeats,
        "total_median_s": med, "cpu_total_median_s": cpu, "ratio_to_full": wall_vs, "cpu_ratio_to_full": cpu_vs,
        "ratio_of_totals_to_full": {n: med[n] / med["full"] for n in med}, "paired_ratio_quartiles": spread,
        "paired_ratios": run["paired"],
        "peak_bytes": peak, "peak_ratio_to_full": {n: peak[n] / peak["full"] for n in peak},
        "extras": extras, "skipped": notes, "machine": machine(),
    }
    if "asl" in ms:
        result["asl_threshold"] = ms["asl"].scorer.threshold
    if "gemfilter" in ms:
        f = ms["gemfilter"].scorer.resolved(n_layers)
        share = statistics.median(r for per_prompt in filter_s for r in per_prompt)  # wall, as filter_seconds
        result["gemfilter_filter_pass"] = {"filter_layer": f, "ratio_to_full": share,
                                           "layers_before_filter_over_n_layers": f / n_layers}
    print(f"model: {model_desc}, {n_layers} layers; {args.task}, {len(prompts)} prompt(s) of "
          f"{sorted({len(p) for p in prompts})} tokens; keep_ratio {args.keep_ratio}; {args.repeats} repeats "
          f"(time), {result['memory_repeats']} (peak memory); times: sum over prompts of the median per prompt; "
          "'vs full': median ratio to a full prefill of the same prompt run beside it; peak: largest median")
    print(f"  {'method':12s} {'prefill':>10s} {'vs full':>8s} {'(quartiles)':>13s} {'CPU time':>10s} {'vs full':>8s} "
          f"{'peak MiB':>9s} {'vs full':>8s}")
    for name in ms:
        q1, q3 = spread.get(name, (1.0, 1.0))
        print(f"  {name:12s} {med[name] * 1000:7.1f} ms {wall_vs[name]:8.3f} {f'{q1:.2f}-{q3:.2f}':>13s} "
              f"{cpu[name] * 1000:7.1f} ms {cpu_vs[name]:8.3f} {peak[name] / 2**20:9.1f} "
              f"{peak[name] / peak['full']:8.3f}{_selection_note(name, extras[name])}")
    for note in notes:
        print(f"  {note}")
    if "gemfilter_filter_pass" in result:
        gf = result["gemfilter_filter_pass"]
        print(f"GemFilter's filter pass alone / full prefill: {gf['ratio_to_full']:.3f} (filter layer "
              f"{gf['filter_layer']} of {n_layers}: {gf['layers_before_filter_over_n_layers']:.3f} of the layers run "
              "whole, plus that layer's q/k/v)")
    print("machine:", json.dumps(result["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
