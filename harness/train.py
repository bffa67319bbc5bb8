"""``kvbench-train``: train a learned eviction method (LKV, SP-KV) on a frozen model; a Hydra app (conf/train.yaml).

    kvbench-train method=lkv model=reference out=harness/reference/lkv
    kvbench-train method=spkv model=tiny-random data.source=random steps=20
    kvbench-train method=lkv model=hf model.path=models/my-llama data.path=corpus.jsonl

Each step takes one sample: the context is prefilled with the full cache (no gradient), the full-cache model's
continuation after the question is the target (``data.target=teacher``; ``answer`` uses the sample's answer,
text corpora their own next tokens), and the method's learner computes the student's logits on the question +
target with its soft compression; loss = ``ce_weight`` * next-token loss + ``kl_weight`` * KL(full || student)
on the target positions + the learner's own terms (LKV's budget penalty, SP-KV's gate sparsity).

Data (``data.source``): ``ruler`` (the RULER generators of ``data.tasks``, seeds from ``data.seed`` >= 1_000_000,
never the evaluation seeds < 1000; falls back to ``synthetic`` while tasks/ruler is missing), ``synthetic``
(built-in needle / multi-key / variable-tracking prompts in the same spirit), ``text`` (``data.path``: a .txt
file or a .jsonl with a "text" field; random windows), ``random`` (random token ids, for tests).

Checkpoints: the learned tensors only (``params.safetensors``) + ``config.json`` (model name/path and
architecture, hyper-parameters, step) every ``save_every`` steps and at the end, plus
``train_state.safetensors`` (optimizer, ``save_train_state``: never a pickle) for resuming: rerunning the same
command continues from the last saved step (the data of step k depends only on ``data.seed + k``, so a resumed
run sees what an uninterrupted one would have).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from omegaconf import ListConfig

from harness.compat import cache_of, with_cache
from harness.errors import KvbenchError
from harness.io import atomic_save, atomic_write_text
from harness.paths import read_json_object

log = logging.getLogger("kvbench.train")
STATE_FILE, HISTORY_FILE = "train_state.safetensors", "history.jsonl"


def learners() -> dict[str, type]:
    """The learner of each learned method, by method name (``harness.learning.register_learner``)."""
    import methods
    from harness.learning import LEARNERS

    methods.load_all()
    return dict(LEARNERS)


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    ctx_ids: list[int]
    q_ids: list[int]
    target_ids: list[int] | None = None  # None = the teacher's greedy continuation
    kind: str = ""


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
WORDS = ("apple river stone cloud maple tiger copper violet harbor falcon lemon orbit canyon willow ember "
         "quartz meadow signal comet cedar velvet prism tundra beacon").split()


def _fill(tok, parts: list[tuple[str, bool]], n_tokens: int, rng: random.Random) -> str:
    """Haystack text of about ``n_tokens`` tokens with the needles inserted at random depths."""
    per = max(1, len(tok(FILLER, add_special_tokens=False).input_ids))
    n_fill = max(1, n_tokens // per)
    chunks = [FILLER] * n_fill
    for text, _ in parts:
        chunks.insert(rng.randrange(len(chunks) + 1), text + " ")
    return "".join(chunks)


def synthetic_example(tok, n_tokens: int, seed: int) -> Example:
    """A needle-in-a-haystack, multi-key or variable-tracking prompt of about ``n_tokens`` tokens."""
    from tasks.ruler.templates import needle_sentence, niah_prompt, vt_prompt, vt_statements  # RULER's text

    rng = random.Random(seed)
    kind = ("niah_single", "niah_multikey", "vt")[seed % 3]
    if kind == "vt":
        value = str(rng.randrange(10000, 99999))
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        needles = [line.rstrip() + "." for line in vt_statements(names, value)]  # sentences in the filler
        _, question, prefix = vt_prompt(value, len(names))
        answer = " ".join(names)  # RULER's answer prefix ends with a space
    else:
        keys = rng.sample(WORDS, 4 if kind == "niah_multikey" else 1)
        values = [str(rng.randrange(1000000, 9999999)) for _ in keys]
        needles = [needle_sentence("numbers", k, v) for k, v in zip(keys, values)]
        key, answer = keys[0], " " + values[0]
        _, question, prefix = niah_prompt("numbers", [key], singular=True)
    reserve = len(tok(question + prefix, add_special_tokens=False).input_ids) + 8 * len(needles) + 24
    context = _fill(tok, [(n, True) for n in needles], max(16, n_tokens - reserve), rng)
    ctx = tok(context, add_special_tokens=True).input_ids
    q = tok(question + prefix, add_special_tokens=False).input_ids
    return Example(list(ctx), list(q), list(tok(answer, add_special_tokens=False).input_ids), kind)


def random_example(vocab: int, n_tokens: int, seed: int, n_question: int = 8) -> Example:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_tokens,), generator=g).tolist()
    return Example(ids[: n_tokens - n_question], ids[n_tokens - n_question:], None, "random")


class TextCorpus:
    """Random windows of a tokenized text corpus: context, one question token, then the scored continuation."""

    def __init__(self, path: str, tok, continuation: int):
        p = Path(path).expanduser()
        if not p.exists():
            raise KvbenchError(f"data.path={path!r} does not exist; pass a .txt file or a .jsonl with a 'text' field")
        if p.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(p.read_text().splitlines()):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise KvbenchError(f"data.path={path!r} line {i + 1} is not JSON with a 'text' field") from None
            text = "\n\n".join(texts)
        else:
            text = p.read_text()
        self.ids = tok(text, add_special_tokens=False).input_ids
        self.continuation = continuation

    def example(self, n_tokens: int, seed: int) -> Example:
        need = n_tokens + self.continuation
        if len(self.ids) < need + 1:
            raise KvbenchError(f"data.path corpus has {len(self.ids)} tokens, fewer than context_length + continuation ({need})")
        start = random.Random(seed).randrange(len(self.ids) - need)
        window = self.ids[start : start + need]
        return Example(window[:n_tokens], window[n_tokens : n_tokens + 1], window[n_tokens + 1 :], "text")


def read_history(path: Path) -> list[dict]:
    """The training log of a checkpoint dir (one JSON object per line); a corrupt line is a one-line error."""
    from harness.paths import read_text

    hint = "delete it (the log restarts) or pass overwrite=true"
    out = []
    for lineno, line in enumerate(read_text(path, hint).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            raise KvbenchError(f"{path}: line {lineno} is not a JSON object; {hint}")
        out.append(entry)
    return out


class DataStream:
    """The example of step k (deterministic in ``data.seed + k``)."""

    def __init__(self, cfg, tok, chat: bool):
        self.cfg, self.tok, self.chat = cfg, tok, chat
        self.source = "text" if cfg.get("path") else str(cfg.source)
        if self.source not in ("ruler", "synthetic", "text", "random"):
            raise KvbenchError(f"data.source={self.source!r} is not supported; allowed: ruler, synthetic, text, random")
        if int(cfg.seed) < 1_000_000:
            raise KvbenchError(f"data.seed={cfg.seed} must be >= 1000000 (evaluation uses seeds < 1000)")
        lengths = cfg.context_length
        self.lengths = [int(x) for x in lengths] if isinstance(lengths, (list, tuple, ListConfig)) else [int(lengths)]
        self.corpus = TextCorpus(cfg.path, tok, int(cfg.continuation)) if self.source == "text" else None
        self.tasks = self.ruler_tasks(cfg.tasks) if self.source == "ruler" else None

    @staticmethod
    def ruler_tasks(names) -> list:
        """(name, task) of each ``data.tasks`` entry; an empty list or an unknown name is an error."""
        import tasks

        if not names:
            raise KvbenchError("data.tasks=[] is empty; name the tasks to train on, e.g. [ruler/niah_single_1], or "
                               "pick data.source=synthetic")
        out = []
        for name in names:
            try:
                out.append((name, tasks.get_task(str(name))))
            except KeyError:
                raise KvbenchError(f"data.tasks: {name!r} is not a task; allowed: {', '.join(tasks.available())}") from None
        return out

    def example(self, step: int) -> Example:
        seed = int(self.cfg.seed) + step
        n_tokens = self.lengths[random.Random(seed).randrange(len(self.lengths))]
        if self.source == "random":
            return random_example(len(self.tok), n_tokens, seed)
        if self.source == "text":
            return self.corpus.example(n_tokens, seed)
        if self.source == "synthetic":
            return synthetic_example(self.tok, n_tokens, seed)
        from tasks.base import PromptEncoder

        name, task = self.tasks[step % len(self.tasks)]
        encoder = PromptEncoder.for_task(self.tok, task, self.chat)
        sample = task.samples(encoder, n_tokens, 1, seed)[0]
        ctx, q = encoder.encode_sample(sample)
        target = None
        if str(self.cfg.target) == "answer":
            answer = sample.answers[0] if len(sample.answers) == 1 else " ".join(sample.answers)
            target = self.tok(" " + answer, add_special_tokens=False).input_ids
        return Example(ctx, q, target, name)


# ------------------------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    ctx_ids: list[int]
    qa_ids: list[int]  # question + target[:-1]: the student's input after the context
    n_ctx: int
    loss_from: int  # index in qa of the first position whose next token is a target
    targets: list[int]
    teacher: torch.Tensor  # [len(targets), V] full-cache logits at the target positions
    cache: Any = None  # full-cache DynamicCache of the context
    hidden: dict = field(default_factory=dict)  # layer -> hidden states of the context (if the learner asked)


@torch.no_grad()
def prepare(model, modules, ex: Example, max_new: int, eos: set[int], want_hidden: bool) -> Batch:
    """Full-cache prefill of the context and the teacher's logits (and continuation) after the question."""
    from transformers import DynamicCache

    from harness.attention import stash_hidden
    from harness.pipeline import greedy
    from methods._learned import copy_cache

    device = model.device
    n_ctx = len(ex.ctx_ids)
    hidden: dict = {}
    handles = stash_hidden(modules, hidden) if want_hidden else []
    try:
        out = model(input_ids=torch.tensor([ex.ctx_ids], device=device), position_ids=torch.arange(n_ctx, device=device)[None],
                    **with_cache(DynamicCache()), use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    cache = cache_of(out)
    q = list(ex.q_ids)
    if ex.target_ids is not None:
        targets = list(ex.target_ids)
        ids = q + targets[:-1]
        o = model(input_ids=torch.tensor([ids], device=device),
                  position_ids=torch.arange(n_ctx, n_ctx + len(ids), device=device)[None],
                  **with_cache(copy_cache(cache)), use_cache=True)
        teacher = o.logits[0, len(q) - 1 :]
    else:
        c = copy_cache(cache)
        o = model(input_ids=torch.tensor([q], device=device),
                  position_ids=torch.arange(n_ctx, n_ctx + len(q), device=device)[None], **with_cache(c), use_cache=True)
        logits: list[torch.Tensor] = []  # the teacher's continuation, its eos included: the student learns to stop
        targets = greedy(model, c, o.logits[:, -1], n_ctx + len(q), max_new, eos, keep_eos=True, chosen_from=logits)
        teacher = torch.cat(logits)
        ids = q + targets[:-1]
    return Batch(list(ex.ctx_ids), ids, n_ctx, len(q) - 1, targets, teacher.float(), cache,
                 {k: v.detach() for k, v in hidden.items()})


def step_loss(learner, model, modules, batch: Batch, keep_ratio: float, gen: torch.Generator, ce_w: float, kl_w: float):
    logits, aux, stats = learner.student_logits(model, modules, batch, keep_ratio, gen)
    student = logits[batch.loss_from : batch.loss_from + len(batch.targets)].float()
    targets = torch.tensor(batch.targets, device=student.device)
    ce = F.cross_entropy(student, targets)
    kl = F.kl_div(student.log_softmax(-1), batch.teacher.log_softmax(-1), log_target=True, reduction="batchmean")
    loss = ce_w * ce + kl_w * kl + sum(aux.values())
    return loss, {"ce": float(ce.detach()), "kl": float(kl.detach()), **{k: float(v.detach()) for k, v in aux.items()}, **stats}


# ------------------------------------------------------------------------------------------------------------
# Training state (also the reference model's: harness/reference/train.py)
# ------------------------------------------------------------------------------------------------------------
STATE_FORMAT = "kvbench-train-state/1"


def save_train_state(path: str | Path, opt: torch.optim.Optimizer, meta: dict, *, model: torch.nn.Module | None = None,
                     rng: random.Random | None = None, torch_rng: bool = False) -> None:
    """The state a resumed run needs, as one safetensors file written atomically (``atomic_save``).

    Tensors: the optimizer's (``opt.<param index>.<name>``), ``model``'s weights (``model.<name>``) and, with
    ``torch_rng``, torch's CPU generator (``torch_rng``, uint8). Header metadata ``state``: JSON with ``meta``
    (step, ...), the optimizer's param groups and non-tensor entries, and ``rng``'s state. Never a pickle: loading
    a state file cannot run code, and one file means a kill never leaves tensors and step from different saves.
    """
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    if model is not None:
        tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    if torch_rng:
        tensors["torch_rng"] = torch.get_rng_state()
    # A copy on CPU: safetensors refuses tensors that share memory (tied input and output embeddings).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    state = {"meta": meta, "param_groups": sd["param_groups"], "opt_scalars": scalars,
             "rng": None if rng is None else list(rng.getstate())}
    header = {"format": STATE_FORMAT, "state": json.dumps(state)}
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_train_state(path: str | Path, opt: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
                     rng: random.Random | None = None, torch_rng: bool = False) -> dict:
    """Restore what ``save_train_state`` saved (the same keyword arguments) and return its ``meta``.

    A file that is not such a state (garbage, an old pickle renamed, a state of another model or optimizer) is a
    one-line KvbenchError naming it; nothing in it is executed.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if header.get("format") != STATE_FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {STATE_FORMAT!r}")
        state = json.loads(header["state"])
        opt_state: dict[int, dict] = {int(i): dict(entry) for i, entry in state["opt_scalars"].items()}
        for name, t in tensors.items():
            if name.startswith("opt."):
                _, idx, key = name.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = t
        opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        for group in opt.param_groups:  # JSON made the optimizer's tuples (AdamW's betas) lists
            group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})
        if model is not None:
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        if rng is not None:
            version, internal, gauss = state["rng"]
            rng.setstate((version, tuple(internal), gauss))
        if torch_rng:
            torch.set_rng_state(tensors["torch_rng"])
        return state["meta"]
    except Exception as err:  # the file is untrusted input: whatever is wrong with it, say which file and stop
        detail = " ".join(str(err).split())[:200]  # one line: load_state_dict lists every key on its own line
        raise KvbenchError(f"{str(path)!r} is not a usable training state ({type(err).__name__}: {detail}); "
                           "delete it to start over") from None


# ------------------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------------------
def model_info(model_cfg, model) -> dict:
    from harness.models import model_identity

    info = {"name": str(model_cfg.get("name")), "path": model_cfg.get("path"),
            "family": model_cfg.get("family") if model_cfg.get("name") == "tiny-random" else None}
    return {**info, **model_identity(model)}


def train(cfg, out_dir: str | Path | None = None) -> dict:
    """Train (or resume) into ``out_dir``; returns the final config.json content."""
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from harness.attention import attention_modules, install
    from harness.models import check_model_identity, load_model
    from harness.pipeline import eos_ids
    from methods._learned import load_checkpoint, save_checkpoint

    name = str(cfg.method.name)
    table = learners()
    if name not in table:
        raise KvbenchError(f"method={name!r} has nothing to train; allowed: {', '.join(sorted(table))}")
    out = Path(out_dir or cfg.get("out") or f"results/train/{name}-{cfg.model.name}")
    torch.set_num_threads(int(cfg.get("threads") or 1))
    torch.manual_seed(int(cfg.seed))
    model, tok = load_model(cfg.model)
    model.requires_grad_(False)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    hp = OmegaConf.to_container(cfg.get(name) or {}, resolve=True)
    learner = table[name](model, method_cfg, hp, seed=int(cfg.seed))
    info = model_info(cfg.model, model)
    chat = bool(cfg.model.get("chat", False))  # PromptEncoder.for_task also needs the tokenizer's template
    data = DataStream(cfg.data, tok, chat)
    params = learner.trainable()
    lr = float(cfg.lr) if cfg.get("lr") is not None else learner.default_lr
    new_optimizer = functools.partial(torch.optim.AdamW, params, lr=lr, weight_decay=float(cfg.weight_decay))
    opt = new_optimizer()
    start, history = 0, []
    if (out / "config.json").exists() and not cfg.get("overwrite", False):
        prev = read_json_object(out / "config.json", "or pass overwrite=true to start again")
        if prev.get("method") != name:
            raise KvbenchError(f"{out} holds a {prev.get('method')!r} checkpoint; use another out=<dir> or overwrite=true")
        recorded = prev.get("model") if isinstance(prev.get("model"), dict) else {}  # none: load_checkpoint says so
        check_model_identity(recorded, model, f"{out} holds a checkpoint for model {recorded.get('name')}",
                             "use another out=<dir> or overwrite=true")
        _, tensors = load_checkpoint(out, name)
        try:
            learner.load_state(tensors)
        except (RuntimeError, KeyError) as err:  # tensors of another learner, or of another shape
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise KvbenchError(f"{out}: its checkpoint tensors do not fit this {name} learner ({first[:200]}); "
                               "use another out=<dir> or overwrite=true") from None
        start = int(prev.get("step", 0))
        if (out / HISTORY_FILE).exists():
            history = read_history(out / HISTORY_FILE)[:start]
        if (out / STATE_FILE).exists():
            saved = load_train_state(out / STATE_FILE, opt).get("step")
            if saved != start:  # stopped between the checkpoint's save and the state's: moments of another step
                log.warning("%s holds the optimizer state of step %s, the checkpoint is of step %d: the optimizer "
                            "restarts", out / STATE_FILE, saved, start)
                opt = new_optimizer()
        else:  # train_state.pt of older versions (a pickle) is not read
            log.warning("%s has no %s: the optimizer restarts", out, STATE_FILE)
        log.info("resuming %s from step %d", out, start)
    steps = int(cfg.steps)
    ratios = [float(r) for r in cfg.keep_ratios]
    eos = eos_ids(model, tok)
    hparams = {**learner.checkpoint_hparams(method_cfg), "lr": lr, "keep_ratios": ratios}

    def save(step: int) -> None:
        extra = {"step": step, "data": OmegaConf.to_container(cfg.data, resolve=True),
                 "seed": int(cfg.seed), "steps": steps}

        class _P(torch.nn.Module):  # what save_checkpoint stores: the learner's tensors
            def state_dict(self, *a, **k):
                return learner.state_dict()

        save_checkpoint(out, name, _P(), info, hparams, extra)
        atomic_write_text(out / HISTORY_FILE, "".join(json.dumps(h) + "\n" for h in history))
        save_train_state(out / STATE_FILE, opt, {"step": step})

    if start >= steps:
        log.info("%s already trained for %d steps", out, start)
        return json.loads((out / "config.json").read_text())
    ema = None
    t0 = time.time()
    with install(model) as _:
        modules = attention_modules(model)
        bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {name}",
                   disable=not cfg.get("progress", True), file=sys.stderr)
        for step in bar:
            ex = data.example(step)
            rng = random.Random(int(cfg.data.seed) + step)
            ratio = ratios[rng.randrange(len(ratios))]
            gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + step)
            batch = prepare(model, modules, ex, int(cfg.data.max_new_tokens), eos, learner.needs_hidden)
            loss, stats = step_loss(learner, model, modules, batch, ratio, gen, float(cfg.ce_weight), float(cfg.kl_weight))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(params, float(cfg.grad_clip))
            opt.step()
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            history.append({"step": step + 1, "loss": round(loss.item(), 5), "ratio": ratio, "kind": ex.kind,
                            **{k: round(v, 5) for k, v in stats.items()}})
            bar.set_postfix(loss=f"{loss.item():.3f}", ema=f"{ema:.3f}", **{k: f"{v:.3f}" for k, v in stats.items()})
            if (step + 1) % int(cfg.save_every) == 0 or step + 1 == steps:
                save(step + 1)
        bar.close()
    log.info("trained %s for %d steps in %.0fs -> %s", name, steps - start, time.time() - t0, out)
    return json.loads((out / "config.json").read_text())


def check_train_config(cfg) -> None:
    """Every value of a kvbench-train config checked (types, ranges, the method), nothing loaded or written."""
    import methods
    from harness.schema import validate_train

    settings = validate_train(cfg)
    methods.build_method(cfg.method)
    if settings.data.source == "ruler" and settings.data.path is None:
        DataStream.ruler_tasks(settings.data.tasks)
    name = str(cfg.method.name)
    if name not in learners():
        raise KvbenchError(f"method={name!r} has nothing to train; allowed: {', '.join(sorted(learners()))}")


def _app(cfg) -> None:
    from harness.cli import fail

    try:
        check_train_config(cfg)
        train(cfg)
    except KvbenchError as err:
        fail(str(err), prog="kvbench-train")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from harness.cli import hydra_command

    hydra_command("kvbench-train", "train", _app, check_train_config, argv)


if __name__ == "__main__":
    main()
