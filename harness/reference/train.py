"""Train the reference model on CPU (or CUDA): ``python -m harness.reference.train --out harness/reference/checkpoint``.

Data (``--recipe``, seeds >= 1_000_000): ``v2`` (default, kvbench issue #28) the 11 offline RULER formats from
``tasks/ruler`` itself, a prose share with an LM loss (``--prose-share``, ``--prose-weight``) and v1's tasks
(``harness.reference.data_v2``), on the 6-layer ``--arch v2``; ``v1`` the shipped checkpoint's recipe:
``harness.reference.data`` (RULER niah / vt templates plus extra retrieval tasks) on the 4-layer ``--arch v1``.
Loss: cross-entropy on the answer tokens (+ EOS), plus ``--lm-weight`` times the LM loss on the rest (prose rows:
their own weights).
Curriculum: sequence length grows from ~256 to 4096 tokens over the run; batches hold ``--batch-tokens``
tokens. AdamW, linear warmup then cosine. Every ``--eval-every`` steps a held-out teacher-forced check (an
answer counts when every answer token is the argmax, i.e. exactly what greedy decoding would emit) at 1k/4k,
a save of the model and tokenizer to ``--out`` and of the full training state to ``--work-dir``/state.safetensors
(``harness.train.save_train_state``; resumable: rerun the same command, and the run continues exactly as an
uninterrupted one would). Every file is written whole or not at all, with the user's umask.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.errors import KvbenchError
from harness.io import atomic_path, atomic_write_text, os_error
from harness.reference.data import corpus_for_tokenizer, focus_example, sample_example
from harness.reference.model import ARCHS, TINY_ARCH, reference_config
from harness.reference.tokenizer import build_tokenizer
from harness.train import load_train_state, save_train_state

STATE_FILE = "state.safetensors"  # save_train_state's format: model, optimizer, step, RNGs; never a pickle
TRAIN_SEED = 1_000_000
HELDOUT_SEED = 900  # < 1000: disjoint from training seeds


def _v2_main(rng, n_tokens, copy_share, formats, prose_share, prose_weight):
    from harness.reference.data_v2 import sample_example_v2

    return sample_example_v2(rng, n_tokens, formats, copy_share=copy_share * 0.5, prose_share=prose_share,
                             prose_weight=prose_weight)


def _v2_focus(rng, n_tokens, copy_share, formats, prose_share, prose_weight):
    from harness.reference.data_v2 import focus_example_v2

    return focus_example_v2(rng, n_tokens, formats, prose_share=prose_share, prose_weight=prose_weight)


def corpus_for_tokenizer_v2(n: int = 600, seed: int = 2_000_001) -> list[str]:
    """v1's tokenizer texts, plus v2's prose and the offline RULER formats (cwe's word lists, fwe's coded words),
    built at 4096 bytes (~1k tokens of the BPE) with a byte tokenizer (the BPE does not exist yet)."""
    from harness.reference.data_v2 import RulerFormats, prose_example
    from harness.tokenizer import byte_tokenizer

    rng = random.Random(seed)
    formats = RulerFormats(byte_tokenizer())
    out = corpus_for_tokenizer()
    for i in range(n):
        if i % 3 == 0:
            out.append("".join(t for t, _ in prose_example(rng, 400).segments))
        else:
            ex = formats.example(rng, 4096, formats.names[i % len(formats.names)])
            out.append(ex.context + "".join(q + t for q, t in ex.turns))
    return out


def curriculum(frac: float, rng: random.Random, max_len: int) -> int:
    """Target sequence length for a task step at fraction ``frac`` of the post-drill run: short contexts
    while the retrieval skill forms (cheap steps, many answers per second), then longer ones so that
    attention learns to stay sharp among thousands of distractors."""
    if frac < 0.3:
        lo, hi = 128, 512
    elif frac < 0.5:
        lo, hi = 256, 1024
    elif frac < 0.65:
        lo, hi = 512, 2048
    elif rng.random() < 0.5:  # a model trained only up to 2k scores ~0 at 4k; ~300 steps at 4k fix that
        lo, hi = 2048, 4096
    else:
        lo, hi = 512, 2048
    hi = min(hi, max_len)
    lo = min(lo, hi)
    return rng.randint(lo, hi)


def encode_example(tok, ex, lm_weight: float):
    """ids, per-token loss weights (target i predicts ids[i]), answer spans [(start, end, task)].

    A language-modelling row (``ex.segments``, v2's prose) is BOS then each piece with its own weight; its
    pieces of weight >= 1 (facts that recur) are its answer spans, logged as ``recur``."""
    if ex.segments is not None:
        ids, w, spans = [tok.bos_token_id], [0.0], []
        for text, weight in ex.segments:
            piece = tok(text, add_special_tokens=False).input_ids
            if weight >= 1.0 and piece:
                spans.append((len(ids), len(ids) + len(piece), "recur"))
            ids += piece
            w += [weight] * len(piece)
        ids.append(tok.eos_token_id)
        w.append(ex.segments[-1][1] if ex.segments else 0.0)
        return ids, w, spans
    ids = list(tok(ex.context).input_ids)
    w = [lm_weight] * len(ids)
    spans = []
    for i, (q, t) in enumerate(ex.turns):
        q_ids = tok(q, add_special_tokens=False).input_ids
        t_ids = tok(t, add_special_tokens=False).input_ids
        if i == len(ex.turns) - 1:
            t_ids = t_ids + [tok.eos_token_id]
        ids += q_ids
        w += [lm_weight] * len(q_ids)
        spans.append((len(ids), len(ids) + len(t_ids), ex.task))
        ids += t_ids
        w += [1.0] * len(t_ids)
    w[0] = 0.0  # BOS is never predicted
    return ids, w, spans


def drill_row(tok, rng: random.Random, length: int):
    """Random token ids in which a segment reappears later (a | filler | a); the loss is on the repeat
    (from its second token: the first is unpredictable). Predicting it needs a previous-token head and an
    induction head, the circuit every retrieval task here is built on. With short rows (~48 tokens, so
    that attention at initialisation is not spread over hundreds of keys) the phase change comes after a
    few hundred steps; on the task mix alone the model sits on a format-only plateau for hours."""
    k = rng.randint(4, max(4, length // 3))
    a = [rng.randrange(3, len(tok)) for _ in range(length)]
    s2 = rng.randint(k + 1, length - k)
    s1 = rng.randint(1, s2 - k)
    a[s2:s2 + k] = a[s1:s1 + k]
    a[0] = tok.bos_token_id
    w = [0.0] * length
    w[s2 + 1:s2 + k] = [1.0] * (k - 1)
    return a, w, [(s2 + 1, s2 + k, "drill")]


def skip_positions(rng: random.Random, n: int, span: int) -> list[int]:
    """PoSE-style position ids (Zhu et al. 2023, "PoSE: efficient context window extension"): the row's
    positions jump by a random skip at a random point, so a short row shows the model the rotary phases of
    query-needle distances up to ``span`` that it will meet in long prompts, at the cost of a short one."""
    if span <= n:
        return list(range(n))
    cut = rng.randint(1, n - 1)
    skip = rng.randint(0, span - n)
    return list(range(cut)) + list(range(cut + skip, n + skip))


def make_batch(tok, rng: random.Random, length: int, batch_tokens: int, lm_weight: float, hard_max: int,
               copy_share: float = 0.15, drill_share: float = 0.0, drill_length: int = 48,
               skip_share: float = 0.0, skip_span: int = 0, sampler=sample_example):
    """(input ids, loss weights, position ids, answer spans) of one batch, right-padded."""
    n = max(1, batch_tokens // length)
    rows = []
    for _ in range(n):
        if rng.random() < drill_share:
            rows.append(drill_row(tok, rng, min(drill_length, length)))
            continue
        want = length
        for _ in range(4):  # the generators size haystacks roughly: shrink until the sequence fits
            ex = sampler(rng, want, copy_share)
            ids, w, spans = encode_example(tok, ex, lm_weight)
            if len(ids) <= 1.15 * length:
                break
            want = max(64, int(want * length / len(ids) * 0.95))
        if len(ids) > hard_max:  # keep the end (the question) and BOS
            cut = len(ids) - hard_max
            ids, w = ids[:1] + ids[cut + 1:], w[:1] + w[cut + 1:]
            spans = [(s - cut, e - cut, k) for s, e, k in spans]
        rows.append((ids, w, spans))
    T = max(len(r[0]) for r in rows)
    x = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    wt = torch.zeros((len(rows), T))
    pos = torch.arange(T).repeat(len(rows), 1)
    for i, (ids, w, _) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        wt[i, : len(w)] = torch.tensor(w)
        if skip_share and rng.random() < skip_share:
            p = skip_positions(rng, len(ids), skip_span)
            pos[i, : len(ids)] = torch.tensor(p)
            pos[i, len(ids):] = torch.arange(p[-1] + 1, p[-1] + 1 + T - len(ids))
    return x, wt, pos, [r[2] for r in rows]


def forward_loss(model, x, wt, pos=None):
    """Answer loss (tokens of weight >= 1, averaged) + the weighted LM loss of the tokens of weight in (0, 1)
    (their weights summed over their count: one weight everywhere, as v1's --lm-weight, is that weight times the
    mean LM loss; v2's prose rows carry their own); logits only where a loss is taken."""
    # use_cache=False: training needs no KV cache (transformers builds one by default and fills it every step).
    if pos is None:
        hidden = model.model(input_ids=x[:, :-1], use_cache=False).last_hidden_state
    else:
        # An explicit all-ones mask: with position ids, no mask and no cache, transformers reads every jump in
        # the positions as the start of a new packed sequence and would hide everything before the skip.
        ones = torch.ones_like(x[:, :-1])
        hidden = model.model(input_ids=x[:, :-1], position_ids=pos[:, :-1], attention_mask=ones,
                             use_cache=False).last_hidden_state
    tgt, w = x[:, 1:], wt[:, 1:]
    sel = w > 0
    logits = model.lm_head(hidden[sel]).float()
    ce = F.cross_entropy(logits, tgt[sel], reduction="none")
    ws = w[sel]
    ans = (ws >= 1.0).float()
    ans_loss = (ce * ans).sum() / ans.sum().clamp(min=1)
    lm = 1.0 - ans
    lm_loss = (ce * lm).sum() / lm.sum().clamp(min=1)
    weighted_lm = (ce * ws * lm).sum() / lm.sum().clamp(min=1)
    pred = torch.full_like(tgt, -1)
    pred[sel] = logits.detach().argmax(-1)
    return ans_loss + weighted_lm, ans_loss, lm_loss, pred


def answer_hits(pred, x, spans_per_row):
    """Per-task (exact answers, answers): an answer is exact if every target token is the argmax."""
    out = defaultdict(lambda: [0, 0])
    for i, spans in enumerate(spans_per_row):
        for s, e, task in spans:
            ok = bool((pred[i, s - 1: e - 1] == x[i, s:e]).all())
            out[task][0] += int(ok)
            out[task][1] += 1
    return out


def heldout_v2(formats, lengths=(2048, 4096)):
    """v2's held-out cells: RULER's own prompts (tasks/ruler) on evaluation seeds (< 1000), the formats v1 lacked
    or scored lowest on, beside niah_single_1 and vt (2k, not 1k: cwe's official prompt needs 1.5k)."""
    from harness.reference.data import Example
    from harness.reference.data_v2 import ruler_target

    def cell(task_name, L):
        def build(r):
            sample = formats.sample(task_name, L, r, 0, 1000)  # an evaluation seed
            return Example(sample.context, [(sample.question + sample.answer_prefix, ruler_target(task_name,
                                                                                                  sample))], task_name)
        return build

    short = {"niah_single_1": "niah1", "niah_multikey_3": "mk3", "niah_multivalue": "mv", "vt": "vt", "cwe": "cwe",
             "fwe": "fwe"}
    return {L: [(short[t], cell(t, L)) for t in short] for L in lengths}


@torch.no_grad()
def heldout_eval(model, tok, device, lengths=(1024, 4096), n=8, cells=None):
    from harness.reference.data import niah, vt

    model.eval()
    res = {}
    for L in (cells or lengths):
        rng = random.Random(HELDOUT_SEED + L)
        todo = cells[L] if cells else [("niah1", lambda r: niah(r, L, "noise")),
                                        ("mk1", lambda r: niah(r, L, "essay", num_k=4)),
                                        ("vt", lambda r: vt(r, L, 1, 4, "noise", icl=True))]
        for name, fn in todo:
            hits = 0
            for _ in range(n):
                ids, w, spans = encode_example(tok, fn(rng), 0.0)
                x = torch.tensor([ids], device=device)
                logits = model(input_ids=x[:, :-1], logits_to_keep=x.size(1) - spans[0][0] + 1).logits
                s, e, _ = spans[0]
                k = logits.size(1)
                pred = logits[0].argmax(-1)  # positions T-k .. T-2 predict T-k+1 .. T-1
                off = x.size(1) - 1 - k
                hits += int((pred[s - 1 - off: e - 1 - off] == x[0, s:e]).all())
            res[f"{name}@{L}"] = hits / n
    model.train()
    return res


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def save_pretrained_atomic(out: Path, *objs) -> None:
    """``save_pretrained`` of each object (model, tokenizer) into a temporary dir beside ``out``, then each file
    moved onto its name in ``out`` through ``atomic_path`` (fsync'd, the user's umask): a kill mid-save leaves the
    previous model.safetensors, never a truncated one. Other files in ``out`` (the model card) stay."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            for obj in objs:
                obj.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                with atomic_path(out / f.name) as dst:
                    os.replace(f, dst)
    except OSError as err:
        raise os_error(err, out) from None


def save(model, tok, out: Path, meta: dict):
    save_pretrained_atomic(out, model, tok)
    atomic_write_text(out / "training_meta.json", json.dumps(meta, indent=1) + "\n")


# Bounds of the numeric flags (low, high); the learning rates must be above their low bound, the rest may equal it.
RANGES = {"steps": (0, math.inf), "batch_tokens": (1, math.inf), "max_len": (16, math.inf), "lr": (0, math.inf),
          "warmup": (0, math.inf), "weight_decay": (0, math.inf), "lm_weight": (0, math.inf),
          "vocab_size": (2, math.inf), "eval_every": (1, math.inf), "log_every": (1, math.inf),
          "threads": (1, math.inf), "seed": (0, math.inf), "drill_steps": (0, math.inf), "drill_rows": (1, math.inf),
          "skip_share": (0, 1), "skip_span": (1, math.inf), "focus_steps": (0, math.inf), "focus_lr": (0, math.inf),
          "time_limit": (0, math.inf), "prose_share": (0, 1), "prose_weight": (0, 0.99)}  # a weight >= 1 would count as an answer token
POSITIVE = {"lr", "focus_lr"}


def main(argv=None):
    from harness.cli import ArgumentParser, interrupts_reported
    from harness.models import device_for

    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="harness/reference/checkpoint")
    ap.add_argument("--recipe", choices=["v1", "v2"], default="v2",
                    help="v2 (default; kvbench issue #28): all 11 offline RULER formats from tasks/ruler plus a prose "
                         "share (harness/reference/data_v2.py); v1: the shipped checkpoint's recipe (niah / vt "
                         "formats only)")
    ap.add_argument("--arch", choices=["v1", "v2"], default=None,
                    help="model size (harness/reference/model.py): v1 4 layers x 128, v2 6 layers x 192; default: "
                         "the recipe's")
    ap.add_argument("--prose-share", type=float, default=0.25, help="v2: share of rows that are prose (LM loss)")
    ap.add_argument("--prose-weight", type=float, default=0.5,
                    help="v2: loss weight of a prose token (a recurring fact's tokens weigh 1)")
    ap.add_argument("--work-dir", default="outputs/reference-train")
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--batch-tokens", type=int, default=6144)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--lm-weight", type=float, default=0.0)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a toy config (tests)")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--drill-steps", type=int, default=700,
                    help="first steps on random-token copying only (see drill_row): the induction phase change "
                         "comes after ~450 of them; on the task mix alone the model sits on a plateau")
    ap.add_argument("--drill-rows", type=int, default=128, help="rows of 48 tokens per drill step")
    ap.add_argument("--skip-share", type=float, default=0.5,
                    help="share of task rows whose position ids jump (skip_positions): long distances, short rows")
    ap.add_argument("--skip-span", type=int, default=10240, help="largest position a skipped row reaches")
    ap.add_argument("--focus-steps", type=int, default=1200,
                    help="steps after --steps on focus_example (mostly RULER-format variable tracking) at 512-4096 "
                         "tokens, with their own warm-up and cosine from --focus-lr: vt was still climbing when "
                         "the main run's learning rate had decayed")
    ap.add_argument("--focus-lr", type=float, default=1e-3)
    ap.add_argument("--init", default=None,
                    help="start from these weights and their tokenizer (a checkpoint dir of the same --arch)")
    ap.add_argument("--time-limit", type=float, default=0, help="stop (after a save) once this many seconds passed")
    args = ap.parse_args(argv)
    for name, (low, high) in RANGES.items():  # argparse checks types only
        value = getattr(args, name)
        if not (math.isfinite(value) and (value > low if name in POSITIVE else value >= low) and value <= high):
            bound = f"> {low}" if name in POSITIVE else f">= {low}"
            ap.error(f"--{name.replace('_', '-')}={value} is out of range; allowed: {bound}"
                     + (f" and <= {high}" if high != math.inf else ""))
    with interrupts_reported(ap.prog, lambda: " (the last saved state is kept)"):
        try:
            device_for(args.device)
            train(args)
        except KvbenchError as err:
            ap.exit(2, f"{ap.prog}: error: {err}\n")


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out, work = Path(args.out), Path(args.work_dir)
    state_path = work / STATE_FILE
    legacy = work / "state.pt"
    if legacy.exists() and not state_path.exists() and not args.no_resume:
        raise KvbenchError(f"{str(legacy)!r} is a training state of an older version, a pickle, which is never "
                           "loaded (unpickling a file can run code); delete it to train from step 0")

    tok_dir = work / "tokenizer"
    recipe = getattr(args, "recipe", "v1")
    if (tok_dir / "tokenizer.json").exists() or args.init:
        from harness.models import load_tokenizer

        tok = load_tokenizer(str(tok_dir if (tok_dir / "tokenizer.json").exists() else args.init))
    else:
        corpus = corpus_for_tokenizer() if recipe == "v1" else corpus_for_tokenizer_v2(n=30 if args.tiny else 600)
        tok = build_tokenizer(corpus, vocab_size=args.vocab_size)
        save_pretrained_atomic(tok_dir, tok)

    from transformers import AutoModelForCausalLM

    arch = TINY_ARCH if args.tiny else ARCHS[getattr(args, "arch", None) or recipe]
    config = reference_config(tok, arch)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    if args.init:
        from harness.models import load_model

        init, _ = load_model({"name": "hf", "path": args.init, "dtype": "float32", "device": "cpu"})
        model.load_state_dict(init.state_dict())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    step, elapsed = 0, 0.0
    rng = random.Random(TRAIN_SEED + args.seed)
    history = []
    if state_path.exists() and not args.no_resume:
        st = load_train_state(state_path, opt, model=model, rng=rng, torch_rng=True)
        step, elapsed, history = st["step"], st["elapsed"], st["history"]
        print(f"resumed at step {step} ({elapsed:.0f}s)", flush=True)
    if recipe == "v2":
        from harness.reference.data_v2 import RulerFormats

        formats = RulerFormats(tok)
        main_mix = functools.partial(_v2_main, formats=formats, prose_share=args.prose_share,
                                     prose_weight=args.prose_weight)
        focus_mix = functools.partial(_v2_focus, formats=formats, prose_share=args.prose_share,
                                      prose_weight=args.prose_weight)
        cells = heldout_v2(formats)
    else:
        main_mix, focus_mix, cells = sample_example, focus_example, None
    n_params = sum(p.numel() for p in model.parameters())
    total = args.steps + args.focus_steps
    print(f"params {n_params/1e6:.2f}M vocab {len(tok)} steps {args.steps} + focus {args.focus_steps}", flush=True)

    model.train()
    t0 = time.time() - elapsed
    acc = defaultdict(lambda: [0, 0])
    agg_loss, agg_n, agg_tok = 0.0, 0, 0
    while step < total:
        if step < args.drill_steps:  # phase 1: the induction drill alone, many short rows
            length = 48
            x, wt, pos, spans = make_batch(tok, rng, length, args.drill_rows * length, 0.0, hard_max=length,
                                      drill_share=1.0)
        else:
            if step >= args.steps:  # phase 3 (focus): RULER's formats at long lengths, vt first
                length = rng.randint(2048, 4096) if rng.random() < 0.7 else rng.randint(512, 2048)
                length = min(length, args.max_len)
                mix = dict(copy_share=0.0, sampler=focus_mix)
            else:  # phase 2: the task mix with a length curriculum, a little drill kept (longer rows)
                frac = (step - args.drill_steps) / max(1, args.steps - args.drill_steps)
                length = curriculum(frac, rng, args.max_len)
                mix = dict(copy_share=0.1, drill_share=0.1, drill_length=rng.choice([64, 128, 256]), sampler=main_mix)
            x, wt, pos, spans = make_batch(tok, rng, length, args.batch_tokens, args.lm_weight,
                                           hard_max=int(args.max_len * 1.1), skip_share=args.skip_share,
                                           skip_span=args.skip_span, **mix)
        x, wt, pos = x.to(device), wt.to(device), pos.to(device)
        for g in opt.param_groups:
            g["lr"] = (lr_at(step, args.steps, args.lr, args.warmup) if step < args.steps
                       else lr_at(step - args.steps, args.focus_steps, args.focus_lr, args.warmup))
        loss, ans_loss, lm_loss, pred = forward_loss(model, x, wt, pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k, (h, n) in answer_hits(pred, x, spans).items():
            acc[k][0] += h
            acc[k][1] += n
        agg_loss += float(ans_loss.detach())
        agg_n += 1
        agg_tok += x.numel()
        step += 1
        if step % args.log_every == 0 or step == total:
            dt = time.time() - t0
            accs = " ".join(f"{k}={h/n:.2f}" for k, (h, n) in sorted(acc.items()))
            print(f"step {step} len {length} ans_loss {agg_loss/agg_n:.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} tok {agg_tok} {dt:.0f}s | {accs}", flush=True)
            acc.clear()
            agg_loss, agg_n, agg_tok = 0.0, 0, 0
        done = step == total or (args.time_limit and time.time() - t0 > args.time_limit)
        if step % args.eval_every == 0 or done:
            elapsed = time.time() - t0
            ev = heldout_eval(model, tok, device, cells=cells) if not args.tiny else {}
            history.append({"step": step, "elapsed_s": round(elapsed), **ev})
            print(f"eval step {step}: {ev}", flush=True)
            meta = {"step": step, "steps": total, "elapsed_s": round(elapsed), "args": vars(args),
                    "history": history}
            save(model, tok, work / f"step{step:05d}", meta)
            save(model, tok, out, meta)
            save_train_state(state_path, opt, {"step": step, "elapsed": elapsed, "history": history},
                             model=model, rng=rng, torch_rng=True)
            t0 = time.time() - elapsed
            if done:
                break
    print("done", flush=True)


if __name__ == "__main__":
    main()
