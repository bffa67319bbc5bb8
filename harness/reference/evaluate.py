"""Greedy-decoding RULER check of a checkpoint (the reference model's own scorer; the harness has the real one).

    python -m harness.reference.evaluate --model harness/reference/checkpoint --tasks niah_single_1,niah_multikey_1,vt \
        --lengths 4096 --n 50

Prompts come from the harness's ``tasks/ruler`` when it exists (``--source auto``), else from this package's
generator (RULER's templates, haystack fitted to the length like RULER's binary search). Seeds are < 1000.
The score is RULER's string_match_all (fraction of reference answers found in the prediction), x100.
"""
from __future__ import annotations

import json
import random
import time

import torch

from harness.compat import cache_of
from harness.errors import KvbenchError
from harness.io import atomic_write_text
from tasks.ruler.metrics import string_match_all
from tasks.ruler.templates import BASE, CONFIGS


def own_generator(task: str):
    """(builder(data_module, rng, n_tokens), max_new_tokens) of a RULER niah / vt task, from the task's own
    configuration (tasks/ruler/templates.py: RULER's synthetic.yaml and tokens_to_generate)."""
    cfg = CONFIGS.get(task, {})
    if cfg.get("task") == "niah":
        def build(d, r, n):
            return d.niah(r, n, cfg["type_haystack"], cfg["type_needle_k"], cfg["type_needle_v"],
                          num_k=cfg["num_needle_k"], num_v=cfg["num_needle_v"], num_q=cfg["num_needle_q"])
    elif cfg.get("task") == "variable_tracking":
        def build(d, r, n):
            return d.vt(r, n, cfg["num_chains"], cfg["num_hops"], cfg["type_haystack"], icl=True)
    else:
        raise KvbenchError(f"--source own generates the niah and vt tasks only, not {task!r}; allowed: "
                           + ", ".join(t for t, c in CONFIGS.items() if c["task"] in ("niah", "variable_tracking")))
    return build, BASE[cfg["task"]]["tokens_to_generate"]


def own_samples(task: str, tok, length: int, n: int, seed: int):
    """(context, question, answers, max_new) fitted so that prompt + max_new <= length (RULER's rule)."""
    from harness.reference import data

    build, max_new = own_generator(task)
    out = []
    for i in range(n):
        base = random.Random(seed * 100_003 + i)
        state = base.getstate()
        lo, hi, best = 64, 2 * length, None
        while lo <= hi:
            mid = (lo + hi) // 2
            base.setstate(state)
            ex = build(data, base, mid)
            q, t = ex.turns[0]
            size = len(tok(ex.context).input_ids) + len(tok(q, add_special_tokens=False).input_ids) + max_new
            if size <= length:
                best, lo = ex, mid + 1
            else:
                hi = mid - 1
        ex = best
        q, t = ex.turns[0]
        answers = [a.strip() for a in t.strip().rstrip(".").replace(", and ", ", ").split(", ")] \
            if task != "vt" else t.split()
        out.append((ex.context, q, answers, max_new))
    return out


def harness_samples(task: str, tok, length: int, n: int, seed: int):
    import tasks as T
    from tasks.base import PromptEncoder

    t = T.get_task(f"ruler/{task}")
    return [(s.context, s.question + s.answer_prefix, list(s.answers), s.max_new_tokens)
            for s in t.samples(PromptEncoder(tok), length, n, seed)]


@torch.no_grad()
def greedy(model, tok, context: str, question: str, max_new: int) -> tuple[str, int]:
    from harness.pipeline import greedy as greedy_tokens

    ids = tok(context).input_ids + tok(question, add_special_tokens=False).input_ids
    out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    eos = set() if tok.eos_token_id is None else {tok.eos_token_id}
    gen = greedy_tokens(model, cache_of(out), out.logits[:, -1], len(ids), max_new, eos)
    return tok.decode(gen, skip_special_tokens=True), len(ids)


def evaluate(model_dir: str, tasks: list[str], lengths: list[int], n: int, seed: int = 0, source: str = "auto",
             verbose: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    use_harness = False
    if source in ("auto", "harness"):
        try:
            import tasks as T

            T.get_task("ruler/niah_single_1")
            use_harness = True
        except Exception:
            if source == "harness":
                raise
    results = {}
    for length in lengths:
        for task in tasks:
            samples = (harness_samples if use_harness else own_samples)(task, tok, length, n, seed)
            t0, scores, ntok = time.time(), [], []
            for ctx, q, answers, max_new in samples:
                pred, n_in = greedy(model, tok, ctx, q, max_new)
                scores.append(string_match_all(pred, answers))
                ntok.append(n_in)
                if verbose and scores[-1] < 1:
                    print(f"  miss {task}@{length}: pred={pred!r} answers={answers}", flush=True)
            key = f"{task}@{length}"
            results[key] = {"score": round(100 * sum(scores) / len(scores), 1), "n": len(scores),
                            "mean_tokens": round(sum(ntok) / len(ntok)),
                            "s_per_sample": round((time.time() - t0) / len(scores), 3),
                            "source": "tasks/ruler" if use_harness else "harness.reference.data"}
            print(key, json.dumps(results[key]), flush=True)
    return results


def main(argv=None):
    from harness.cli import ArgumentParser
    from harness.reference import CHECKPOINT_DIR

    ap = ArgumentParser(description="greedy RULER check of a checkpoint")
    ap.add_argument("--model", default=str(CHECKPOINT_DIR))
    ap.add_argument("--tasks", default="niah_single_1,niah_multikey_1,vt")
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", choices=["auto", "own", "harness"], default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    assert args.seed < 1000, "eval seeds are < 1000 (training uses >= 1_000_000)"
    torch.set_num_threads(args.threads)
    res = evaluate(args.model, args.tasks.split(","), [int(x) for x in args.lengths.split(",")], args.n,
                   args.seed, args.source, args.verbose)
    if args.json:  # whole or not at all: the model card reads these files
        try:
            atomic_write_text(args.json, json.dumps(res, indent=1))
        except KvbenchError as err:
            ap.exit(2, f"{ap.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
