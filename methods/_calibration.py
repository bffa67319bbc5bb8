"""What the calibration commands of the methods that read a per-model file share (``python -m methods.qfilter``,
``python -m methods.duo_attention``): kvbench's own overrides (``model=``, ``task=``, ``context_length=``,
``n_samples=``, ``seed=``) composed and checked as ``kvbench`` checks them, the command's own keys (``out=``, ...)
checked by a pydantic model, the model loaded, and calibration prompts built from kvbench's generated tasks
(``calibration_prompts``, which ``kvbench-profile`` uses too: context ids, question + reference answer ids) or
random ids (``task=random``). Methods import no command module (harness/__init__.py: layers), so the few command
helpers these need (the one-line error, the interrupt) are here.

Bad input is one line ``<prog>: error: ...`` and exit 2, as everywhere in kvbench.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import BaseModel, ValidationError

from harness.errors import KvbenchError


@dataclass
class Calibration:
    cfg: Any  # the composed kvbench config (model, task, context_length, n_samples, seed)
    own: dict[str, Any]  # the command's own keys, validated (``options`` model dump)
    model: Any
    tokenizer: Any
    prompts: list[tuple[list[int], list[int]]]  # (context ids, question + answer ids)
    source: str  # the task name, or "random"
    meta: dict[str, Any]  # what the file should record: model name, model config, task, samples, length, seed


def split_args(argv: list[str], own_keys: set[str]) -> tuple[dict[str, str], list[str]]:
    """``(own, overrides)``: the command's own ``key=value`` arguments (quotes stripped) and kvbench's."""
    own, overrides = {}, []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" in arg and key in own_keys:
            value = arg.split("=", 1)[1]
            own[key] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value
        elif arg == "task=random":  # random ids as calibration contexts: not a registered task
            own["task"] = "random"
        else:
            overrides.append(arg)
    return own, overrides


def check_groups(overrides: list[str]) -> None:
    """A ``model=`` / ``task=`` choice that is no config is one line naming the allowed ones (as ``kvbench`` says)."""
    import conf

    for arg in overrides:
        group, _, value = arg.lstrip("+").partition("=")
        if group in ("model", "task") and value and value not in (allowed := conf.options(group)):
            near = [a for a in allowed if "/" in value and a.startswith(value.rsplit("/", 1)[0] + "/")]
            shown = near or sorted({a.split("/", 1)[0] + ("/<name>" if "/" in a else "") for a in allowed})
            raise KvbenchError(f"{group}={value!r} is not known; allowed: {', '.join(shown)}")


def prepare(argv: list[str], options: type[BaseModel], future_tokens: int = 64) -> Calibration:
    """Compose, check, load the model and build the calibration prompts (a ``KvbenchError`` for bad input)."""
    from omegaconf import OmegaConf

    from conf import CONF_DIR
    from harness.models import load_model, model_name
    from harness.overrides import Composer
    from harness.schema import to_error, validate

    own_keys = set(options.model_fields) - {"task"}
    own, overrides = split_args(argv, own_keys)
    try:
        checked = options.model_validate(own).model_dump()
    except ValidationError as err:
        raise to_error(err, own, known=options.model_fields) from None
    check_groups(overrides)
    with Composer(CONF_DIR, "config") as composer:
        cfg = composer.compose(overrides)
    validate(cfg)
    random = checked.get("task") == "random"
    n_samples = None if cfg.n_samples is None else int(cfg.n_samples)
    if random and n_samples is None:
        raise KvbenchError("task=random needs n_samples=<number of calibration contexts>")
    model, tok = load_model(cfg.model)
    prompts, source = calibration_prompts(tok, cfg, n_samples, int(cfg.context_length), int(cfg.seed),
                                          future_tokens, bool(cfg.model.get("chat", False)), random)
    meta = {"model": model_name(model, str(cfg.model.name)),
            "model_cfg": OmegaConf.to_container(cfg.model, resolve=True), "task": source,
            "n_samples": len(prompts), "context_length": int(cfg.context_length), "seed": int(cfg.seed)}
    return Calibration(cfg, checked, model, tok, prompts, source, meta)


def main(prog: str, doc: str, run: Callable[[list[str]], str], argv: list[str] | None = None) -> None:
    """The command's entry point: ``run(argv)`` returns the line to print (what was written)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(doc)
        return
    try:
        line = run(argv)
    except KvbenchError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (nothing written)", file=sys.stderr)
        sys.exit(130)
    print(line)


def provenance(prog: str, argv: list[str], command_key: str = "command") -> dict[str, str]:
    """What a calibration command records of its own run in the file it writes: the UTC time and the command
    line (``command_key``: the key the file format names it by)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command_key: " ".join([prog, *argv])}


def calibration_prompts(tokenizer, cfg, n_samples: int | None, context_length: int, seed: int, future_tokens: int,
                        chat: bool, random: bool = False) -> tuple[list[tuple[list[int], list[int]]], str]:
    """(context ids, future ids) pairs from the task (question + answer teacher-forced), or random ids.

    A task that cannot be built (unknown, data missing or corrupt) is an error, never a silent switch to
    random tokens: the profile would then describe other inputs than its metadata says."""
    if not random:
        from omegaconf import OmegaConf

        import tasks
        from tasks.base import PromptEncoder

        task_name = str(cfg.task.name)
        try:
            params = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items()
                      if k not in ("name", "exclude")}  # harness.runner.task_params
            task = tasks.get_task(task_name, **params)
        except KeyError:
            raise KvbenchError(f"task={task_name!r} is not a task kvbench-profile can calibrate on; allowed: random, "
                               f"{', '.join(tasks.available())}") from None
        encoder = PromptEncoder.for_task(tokenizer, task, chat)
        out = []
        for sample in task.samples(encoder, context_length, n_samples, seed):
            ctx, q = encoder.encode_sample(sample)
            answer = tokenizer(sample.answers[0], add_special_tokens=False).input_ids if sample.answers else []
            out.append((list(ctx), list(q) + list(answer)))
        if not out:
            raise KvbenchError(f"task={task_name!r} gave no calibration samples (n_samples={n_samples})")
        return out, task_name
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else 256
    low = min(8, vocab - 1)
    out = []
    for _ in range(n_samples):
        ids = torch.randint(low, vocab, (context_length,), generator=gen).tolist()
        n_future = min(future_tokens, context_length // 4)
        out.append((ids[: context_length - n_future], ids[context_length - n_future :]))
    return out, "random"


# ----------------------------------------------------------------------------------------------------------------
# A calibration forward with our own attention function

CALIBRATION_ATTN = "kvbench_calibration"
_ACTIVE: list = []  # the attention function of the innermost ``attention_function`` block


def _dispatch(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _ACTIVE[-1](module, query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5)


def causal_attention(query, key, value, scaling: float, mask=None):
    """``[B, T, H_q, D]`` attention of a full prefill (causal, or the bool ``mask``, True = attend), GQA keys and
    values repeated to the query heads."""
    import torch.nn.functional as F

    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling)
    return out.transpose(1, 2).contiguous()


def attention_function(model, fn):
    """Context manager: the model's attention is ``fn(module, query, key, value, scaling) -> [B, T, H_q, D]`` (queries
    after RoPE and q_norm, as the model computes them; full prefills only, no cache) for the duration, then the
    model's previous implementation again. Registered under its own name, so it may run inside a kvbench run
    (``harness.attention.install``) without touching that run's hooks."""
    from contextlib import contextmanager

    from transformers import AttentionInterface

    @contextmanager
    def block():
        AttentionInterface.register(CALIBRATION_ATTN, lambda *a, **k: (_dispatch(*a, **k), None))
        previous = model.config._attn_implementation
        _ACTIVE.append(fn)
        model.set_attn_implementation(CALIBRATION_ATTN)
        try:
            yield
        finally:
            _ACTIVE.pop()
            model.set_attn_implementation(previous)

    return block()


def random_prompts(vocab_size: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` sequences of ``length`` ids uniform in ``[min(8, V - 1), V)`` (special ids left out), seeded."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    low = min(8, vocab_size - 1)
    return [torch.randint(low, vocab_size, (length,), generator=gen).tolist() for _ in range(n)]
