"""Run the benchmarks and rewrite the README's measured figures (between the bench markers), with the
machine and date. One command: ``make bench``.

    python benchmarks/refresh_readme.py [--skip-kvpress] [--skip-ragged] [--skip-batching] [--context 4096]

Besides ``speed.py`` (and ``vs_kvpress.py``) it runs ``ragged_decode.py --threads 1`` (ragged / uniform decode
step) and ``batching.py`` (batch 8 / batch 1 samples per second), each at its own defaults.

The kvpress comparison needs kvpress's own venv (``bash tools/peers/kvpress-env.sh``);
without it that line says so instead of a number.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def run_json(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, *args, "--json", out.name], cwd=ROOT, check=True)
        return json.loads(Path(out.name).read_text())


def _span(value: float, lo_hi: list[float] | None) -> str:
    return f"{value:.2f}x" + (f" ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if lo_hi else "")


def _cpu(ratio: float | None) -> str:
    return f"; CPU time {ratio:.2f}x" if ratio is not None else ""


def ragged_lines(ragged: dict) -> list[str]:
    """One table row per ragged split: its decode step over the uniform cache's (``ragged_decode.py``)."""
    rows = []
    for name, ratio in ragged["ratios"].items():
        if name.startswith("ragged"):
            split = "/".join(name.split()[1].split(","))
            rows.append(f"| ragged / uniform decode step, same total (KV heads {split} vs "
                        f"{ragged['budget_per_head']} each) | {_span(ratio, ragged['ratio_range'].get(name))}"
                        f"{_cpu(ragged.get('cpu_ratios', {}).get(name))} | "
                        "<= 1.2x |")
    return rows


def batching_lines(batching: dict) -> list[str]:
    """One table row per method: samples per second at the larger batch size over batch size 1 (``batching.py``)."""
    b = batching["batch_size"]
    return [f"| batch {b} / batch 1 samples per second ({name}) | {_span(r['ratio'], r['ratio_range'])}"
            f"{_cpu(r.get('cpu_ratio'))} | >= 1.5x |" for name, r in batching["methods"].items()]


def settings_line(ragged: dict | None, batching: dict | None) -> str | None:
    """The settings (and machine load) of the ragged and batching rows, which differ from the speed rows'."""
    parts = []
    if ragged:
        parts.append(f"ragged rows: reference model, {ragged['prompt_tokens']}-token prompt, {ragged['steps']} greedy "
                     f"steps, {ragged['machine']['threads']} thread(s), median over {ragged['repeats']} repeats, load "
                     f"{ragged['machine'].get('load_average')}")
    if batching:
        same = all(r["same_predictions_and_scores"] for r in batching["methods"].values())
        parts.append(f"batch rows: the runner on {batching['n_samples']} {batching['task']} samples of "
                     f"{batching['context_length']} tokens, {batching['max_new_tokens']} new tokens, median over "
                     f"{batching['repeats']} repeats, predictions and scores "
                     f"{'identical' if same else 'DIFFERENT'} at both batch sizes, load "
                     f"{batching['machine'].get('load_average')}")
    return ("; ".join(parts) + ".") if parts else None


def render(speed: dict, kvpress: dict | None, kvpress_note: str, ragged: dict | None = None,
           batching: dict | None = None) -> str:
    m = speed["machine"]
    r, rng = speed["ratios"], speed.get("ratio_range", {})

    def cell(name: str) -> str:
        lo_hi = rng.get(name)
        return f"{r[name]:.2f}x" + (f" ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if lo_hi else "")

    lines = [
        START,
        f"Measured {speed['date']} on {m.get('cpu', m['platform'])}, {m['threads']} threads, {m['device']}, "
        f"torch {m['torch']}; model `{speed['model']}`, {speed['context_tokens']}-token prompt, "
        f"{speed['new_tokens']} new tokens; each ratio is the median over {speed.get('repeats', 'the')} repeats of "
        "two runs back to back (range in brackets); `make bench` refreshes this block.",
        "",
        "| measurement | ratio | target |",
        "|---|---|---|",
        f"| 5-ratio SnapKV sweep / single ratio (ours) | {cell('sweep_5_ratios / single_ratio')} | <= 1.3x |",
        f"| 5 separate runs / our 5-ratio sweep | {cell('separate_5 / sweep_5_ratios')} | |",
        f"| harness full cache / bare `model.generate` | {cell('harness_full / bare_generate')} | <= 1.05x |",
    ]
    if kvpress:
        pairs = kvpress.get("kvpress_time / ours per interleaved pair") or []
        ratio = kvpress.get("kvpress_time / ours") or kvpress.get("ratio")
        span = f" ({min(pairs):.2f}-{max(pairs):.2f})" if pairs else ""
        lines.append(f"| kvpress 5-ratio SnapKV sweep / ours | {ratio:.2f}x{span} | >= 3x |")
    else:
        lines.append(f"| kvpress 5-ratio SnapKV sweep / ours | {kvpress_note} | >= 3x |")
    if ragged:
        lines += ragged_lines(ragged)
    if batching:
        lines += batching_lines(batching)
    note = settings_line(ragged, batching)
    if note:
        lines += ["", note[0].upper() + note[1:]]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-kvpress", action="store_true")
    parser.add_argument("--skip-ragged", action="store_true")
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    speed = run_json(["benchmarks/speed.py", "--context", str(args.context)])
    kvpress, note = None, "not run (no kvpress venv)"
    venv = ROOT / ".peers/kvpress-venv/bin/python"
    if not args.skip_kvpress and venv.exists():
        kvpress = run_json(["benchmarks/vs_kvpress.py", "--context", str(args.context)])
    # one thread: a ~1 ms step on two threads shared with other work is timed in whole scheduler slices (~32 ms)
    ragged = None if args.skip_ragged else run_json(["benchmarks/ragged_decode.py", "--threads", "1"])
    batching = None if args.skip_batching else run_json(["benchmarks/batching.py"])
    block = render(speed, kvpress, note, ragged, batching)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n" + block + "\n"
    readme.write_text(text)
    print(block)
    print(f"README.md updated {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
