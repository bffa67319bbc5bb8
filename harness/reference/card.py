"""Write the reference checkpoint's model card (``README.md`` beside the weights) from what the run recorded.

    python -m harness.reference.card [--checkpoint harness/reference/checkpoint] [--results results/reference]

Architecture from ``config.json``, recipe and time from ``training_meta.json`` (written by the training run),
scores from the ``eval_*.json`` files of ``python -m harness.reference.evaluate --json`` (see
scripts/reference_results.sh), and the machine the card is written on is *not* assumed to be the training
machine: the training machine is passed with ``--hardware``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from harness.errors import KvbenchError
from harness.io import atomic_write_text


def _arch(cfg: dict, n_params: int, size_mb: float) -> str:
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    return (f"Llama ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, "
            f"{cfg['num_attention_heads']} query / {cfg['num_key_value_heads']} KV heads of dim {cfg['head_dim']}, "
            f"RoPE theta {rope:g}, tied embeddings), vocabulary {cfg['vocab_size']}, {n_params / 1e6:.2f}M "
            f"parameters, float32, {size_mb:.1f} MB.")


def _data_v2(args: dict) -> list[str]:
    """The v2 recipe's data (harness/reference/data_v2.py), as the run's arguments set it."""
    return [
        "- **Data** (`--recipe v2`: `harness/reference/data_v2.py`, seeds >= 1,000,000; evaluation uses seeds < 1000):",
        "  the 11 offline RULER tasks (niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt,",
        "  cwe, fwe) built by kvbench's own `tasks/ruler` generators at 384-4096 tokens, so training prompts are",
        "  RULER's official ones; v1's varied retrieval tasks and list copying; a random-token induction drill; and",
        f"  {int(args['prose_share'] * 100)}% prose rows with a language-modelling loss (weight "
        f"{args['prose_weight']}): CPython's reference manual (`pydoc_data.topics`, shipped with CPython), stdlib",
        "  docstrings, template prose and RULER's noise lines, in most rows with a few facts that recur later,",
        "  uncued (their tokens weigh 1). Loss otherwise on answer tokens only.",
    ]


def _scores(results: Path) -> list[str]:
    rows = []
    for path in sorted(results.glob("eval_*.json")):
        for key, r in json.loads(path.read_text()).items():
            task, length = key.split("@")
            rows.append(f"| {task} | {length} | {r['score']:.1f} | {r['n']} | {r['s_per_sample']:.2f} |")
    return rows


def render(checkpoint: Path, results: Path, hardware: str, note: str = "") -> str:
    cfg = json.loads((checkpoint / "config.json").read_text())
    meta = json.loads((checkpoint / "training_meta.json").read_text())
    args = meta["args"]
    weights = checkpoint / "model.safetensors"
    size_mb = weights.stat().st_size / 1e6
    n_params = sum(math.prod(s) for s in _shapes(weights))
    minutes = meta["elapsed_s"] / 60
    default_cmd = "python -m harness.reference.train --no-resume" + (
        " --recipe v1" if args.get("recipe", "v1") == "v1" else "")
    scores = _scores(results)
    lines = [
        "# kvbench reference model",
        "",
        "A tiny long-context model trained by this repository so that CPU runs of kvbench score something and",
        "eviction methods can be told apart offline. It is a synthetic-task specialist: it answers RULER-format",
        "retrieval and variable-tracking prompts; it is not a language model for anything else.",
        "",
        "- **Architecture**: " + _arch(cfg, n_params, size_mb),
        "- **Tokenizer**: byte-level BPE trained on the generators' text (2048 tokens), single digits and single",
        "  capital letters isolated so numbers and variable names are copied one token at a time.",
        *(_data_v2(args) if args.get("recipe", "v1") == "v2" else [
            "- **Data** (`harness/reference/data.py`, seeds >= 1,000,000; evaluation uses seeds < 1000): RULER's",
            "  niah and variable-tracking templates (noise, essay, needle and word haystacks; 1-6 keys, several "
            "values",
            "  or queries; chains of 1-6 hops, with and without RULER's solved example), dense key-value lookups and",
            "  list copying, plus a random-token induction drill. Loss on answer tokens only."]),
        f"- **Recipe**: {args['drill_steps']} drill steps ({args['drill_rows']} rows of 48 random tokens with a "
        "repeated segment: the induction phase change comes at ~450), then the task mix for "
        f"{args['steps'] - args['drill_steps']} steps of ~{args['batch_tokens']} tokens with a length curriculum "
        f"(128-512, 256-1k, 512-2k, then half 2k-{args['max_len']}), {int(args['skip_share'] * 100)}% of rows "
        f"with PoSE-style position skips up to {args['skip_span']}; AdamW (betas 0.9/0.95, weight decay "
        f"{args['weight_decay']}), peak lr {args['lr']}, {args['warmup']} warm-up steps, cosine to 10%, "
        "gradient clip 1." + (
            f" Then a focus phase of {args['focus_steps']} steps ("
            + ("`focus_example_v2`: the 11 RULER formats, the prose share kept" if args.get("recipe") == "v2" else
               "`focus_example`: half RULER-format variable tracking with its solved example in front, 20% "
               "multikey needles, 10% single needles, 20% the main mix") + ") "
            f"at 512-{args['max_len']} tokens (70% of steps 2k-{args['max_len']}), its own warm-up and cosine from "
            f"lr {args['focus_lr']}." if args.get("focus_steps") else ""),
        f"- **Hardware and time**: {hardware}; {meta['step']} steps in {minutes:.0f} minutes."
        + (f" {note}" if note else ""),
        f"- **Reproduce**: `{default_cmd}` (resumable: rerun to continue; `--device cuda` on a GPU), then",
        "  `bash scripts/reference_results.sh eval` for the scores below.",
        "",
        "## RULER scores (greedy decoding, full cache, prompts from `tasks/ruler`, seeds < 1000)",
        "",
        "| task | context | score | n | s / sample |",
        "|---|---|---|---|---|",
        *(scores or ["| (not evaluated yet) | | | | |"]),
        "",
        "Eviction methods on this model: see docs/reference-model.md in the kvbench repository.",
        "",
        "## Training log (held-out teacher-forced exact answers, 8 prompts per cell)",
        "",
        "| step | minutes | " + " | ".join(k for k in meta["history"][-1] if "@" in k) + " |",
        "|---|---|" + "---|" * sum("@" in k for k in meta["history"][-1]),
    ]
    for h in meta["history"][:: max(1, len(meta["history"]) // 10)] + meta["history"][-1:]:
        lines.append(f"| {h['step']} | {h['elapsed_s'] / 60:.0f} | "
                     + " | ".join(f"{h.get(k, 0):.2f}" for k in meta["history"][-1] if "@" in k) + " |")
    return "\n".join(lines) + "\n"


def _shapes(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            yield f.get_slice(k).get_shape()


def main(argv=None):
    from harness.cli import ArgumentParser
    from harness.reference import CHECKPOINT_DIR

    ap = ArgumentParser(description="write the reference model card")
    ap.add_argument("--checkpoint", default=str(CHECKPOINT_DIR))
    ap.add_argument("--results", default="results/reference")
    ap.add_argument("--hardware", required=True, help="the machine the model was trained on, in words")
    ap.add_argument("--note", default="", help="anything else a reader must know about this run")
    args = ap.parse_args(argv)
    try:
        text = render(Path(args.checkpoint), Path(args.results), args.hardware, args.note)
        atomic_write_text(Path(args.checkpoint) / "README.md", text)
    except OSError as err:  # config.json or training_meta.json missing: the checkpoint is not a trained one
        ap.exit(2, f"{ap.prog}: error: cannot read {str(err.filename)!r}: {err.strerror}\n")
    except KvbenchError as err:
        ap.exit(2, f"{ap.prog}: error: {err}\n")
    print(f"wrote {Path(args.checkpoint) / 'README.md'}")


if __name__ == "__main__":
    main()
