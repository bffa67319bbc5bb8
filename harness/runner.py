"""The run loop: ``for sample: prefill -> compress -> decode -> score -> append row``.

A run directory holds ``config.yaml`` (the resolved config), ``predictions.jsonl`` (one row per task,
sample, method and keep ratio, appended durably) and ``metrics.json``. Rerunning the same config in the same
directory skips the rows already written; a different config there is refused unless ``overwrite=true``.
"""
from __future__ import annotations

import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

import methods
import tasks
from harness.attention import install
from harness.compress import evidence_retention
from harness.errors import KvbenchError
from harness.fingerprint import run_inputs
from harness.io import RowStore, atomic_write_json, atomic_write_text
from harness.metrics import summarize
from harness.models import load_model, max_context
from harness.pipeline import run_sample
from tasks.base import PromptEncoder

log = logging.getLogger("kvbench")

# Keys that may change between a run and its resumption without changing its rows.
VOLATILE_KEYS = ("overwrite", "output_dir", "progress", "paper")  # paper: published numbers, not run inputs


def keep_ratios(value: Any) -> list[float]:
    """``keep_ratio`` as a list: a number, or a list for one multi-budget run."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values:
        raise KvbenchError("keep_ratio=[] is empty; give a number in (0, 1] or a list of them, e.g. [0.25,0.5]")
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise KvbenchError(f"keep_ratio={v!r} is not a number; allowed: (0, 1]") from None
        if not 0.0 < f <= 1.0:
            raise KvbenchError(f"keep_ratio={v} is out of range; allowed: (0, 1] (1.0 = full cache)")
        out.append(f)
    return out


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in VOLATILE_KEYS}


def prepare_dir(out_dir: Path, cfg: DictConfig, inputs: dict | None = None) -> None:
    """Create the run dir, or check that an existing one was made by the same config and the same input files
    (``inputs``: fingerprints of the model weights and method files, see harness/fingerprint.py)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise KvbenchError(f"output dir {str(out_dir)!r} is not writable ({err.strerror}); pass hydra.run.dir=<dir>") from None
    config_path = out_dir / "config.yaml"
    if config_path.exists() and not cfg.get("overwrite", False):
        previous = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
        before = previous.pop("inputs", None)  # None: a dir from before fingerprints, nothing to check
        if before is not None and inputs is not None and before != inputs:
            changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
            raise KvbenchError(
                f"{out_dir} holds rows made with other files ({', '.join(changed)} changed since: retrained or "
                "replaced); use another hydra.run.dir, or overwrite=true to discard them"
            )
        if _comparable(previous) != _comparable(resolved):
            changed = sorted(k for k in set(previous) | set(resolved)
                             if k not in VOLATILE_KEYS and previous.get(k) != resolved.get(k))
            raise KvbenchError(
                f"{out_dir} holds a run with a different config (changed: {', '.join(changed)}); "
                "use another hydra.run.dir, or overwrite=true to discard it"
            )
    if cfg.get("overwrite", False):
        for name in ("predictions.jsonl", "metrics.json"):
            if (out_dir / name).exists():
                (out_dir / name).unlink()
    atomic_write_text(config_path, OmegaConf.to_yaml(resolved if inputs is None else {**resolved, "inputs": inputs}))


def task_params(task_cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(task_cfg, resolve=True).items() if k not in ("name", "exclude")}


def suite_tasks(task_cfg: DictConfig) -> list[str]:
    """The task names a ``task=`` runs: one task, or a suite minus ``task.exclude`` (e.g. RULER's qa_1/qa_2
    when SQuAD/HotpotQA are not on disk). Excluding is explicit, never silent: rows name their tasks."""
    try:
        names = tasks.expand(task_cfg.name)
    except KeyError:
        raise KvbenchError(f"task={task_cfg.name!r} is not known; allowed: {', '.join(tasks.available())}") from None
    exclude = [str(x) for x in (task_cfg.get("exclude") or [])]
    prefix = f"{task_cfg.name}/"
    full = [x if "/" in x else prefix + x for x in exclude]
    unknown = [x for x, f in zip(exclude, full) if f not in names]
    if unknown:
        short = ", ".join(n.removeprefix(prefix) for n in names)
        raise KvbenchError(f"task.exclude={unknown[0]!r} is not a task of {task_cfg.name}; allowed: {short}")
    kept = [n for n in names if n not in full]
    if not kept:
        raise KvbenchError(f"task.exclude leaves no task of {task_cfg.name} to run")
    return kept


def model_label(model_cfg) -> str:
    if model_cfg.get("name") == "hf" and model_cfg.get("path"):
        return Path(str(model_cfg.path).rstrip("/")).name
    return str(model_cfg.get("name"))


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run one config into ``out_dir``; returns the metrics."""
    out_dir = Path(out_dir)
    ratios = keep_ratios(cfg.keep_ratio)
    method = methods.build_method(cfg.method)
    task_names = suite_tasks(cfg.task)
    if int(cfg.n_samples) < 1:
        raise KvbenchError(f"n_samples={cfg.n_samples} must be at least 1")
    torch.manual_seed(int(cfg.seed))
    model, tokenizer = load_model(cfg.model)
    for part in (method.scorer, method.allocator):  # a checkpoint or profile made for another model is refused
        bind = getattr(part, "bind_model", None)
        if bind is not None:
            bind(model)
    limit = max_context(model)
    if limit and int(cfg.context_length) > limit:
        raise KvbenchError(
            f"context_length={cfg.context_length} is larger than the model's maximum ({limit} positions)"
        )
    chat = bool(cfg.model.get("chat", False)) and getattr(tokenizer, "chat_template", None) is not None
    # Load every task's samples before writing anything: bad data fails the run before it touches the dir.
    loaded = []
    for name in task_names:
        task = tasks.get_task(name, **task_params(cfg.task))
        encoder = PromptEncoder(tokenizer, chat=chat and not getattr(task, "skip_chat_template", False))
        samples = task.samples(encoder, int(cfg.context_length), int(cfg.n_samples), int(cfg.seed))
        for sample in samples:
            n_tokens = encoder.count(sample.context, sample.question + sample.answer_prefix)
            if n_tokens > int(cfg.context_length):
                raise KvbenchError(
                    f"context_length={cfg.context_length} is smaller than the prompt of {name} "
                    f"({n_tokens} tokens for sample {sample.sample_id}); raise context_length"
                )
        loaded.append((name, task, encoder, samples))
    prepare_dir(out_dir, cfg, run_inputs(model, (method.scorer, method.allocator)))
    store = RowStore(out_dir / "predictions.jsonl")
    label = model_label(cfg.model)
    if not method.shares_across_ratios and len(ratios) > 1:
        log.info("%s cannot share a prefill across keep ratios: one prefill per ratio", method.name)
    total = sum(len(s) for _, _, _, s in loaded)
    bar = tqdm(total=total, desc=f"{method.name} {cfg.task.name}", disable=not cfg.get("progress", True))
    with install(model) as hooks:
        for name, task, encoder, samples in loaded:
            for sample in samples:
                todo = [r for r in ratios
                        if RowStore.key({"task": name, "sample_id": sample.sample_id, "method": method.name,
                                         "keep_ratio": r}) not in store.done]
                if todo:
                    store.append(_sample_rows(cfg, model, tokenizer, hooks, method, task, name, encoder, sample,
                                              todo, label))
                bar.update(1)
    bar.close()
    metrics = summarize(store.rows)
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def _sample_rows(cfg, model, tokenizer, hooks, method, task, name, encoder, sample, ratios, label) -> list[dict]:
    ctx_ids, q_ids = encoder.encode_sample(sample)
    max_new = int(cfg.max_new_tokens) if cfg.get("max_new_tokens") else sample.max_new_tokens
    base = {
        "task": name, "sample_id": sample.sample_id, "method": method.name, "model": label,
        "context_length": int(cfg.context_length), "seed": int(cfg.seed), "query_aware": bool(cfg.query_aware),
        "answers": list(sample.answers), "meta": _jsonable(sample.meta),
    }
    evidence = (encoder.context_token_indices(sample.context, sample.meta["evidence"])
                if sample.meta.get("evidence") else None)
    try:
        outcomes = run_sample(model, tokenizer, hooks, method, ctx_ids, q_ids, ratios, bool(cfg.query_aware),
                              max_new, task.stop_strings(), seed=int(cfg.seed), keep_indices=evidence is not None)
    except (RuntimeError, torch.cuda.OutOfMemoryError, ValueError, IndexError) as err:
        # One failing sample (CUDA OOM, a generation error) must not end a sweep: record it and go on.
        log.warning("sample %s failed: %s", sample.sample_id, _error_text(err))
        log.debug(traceback.format_exc())
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [{**base, "keep_ratio": r, "prediction": None, "score": None, "error": _error_text(err)}
                for r in ratios]
    rows = []
    for o in outcomes:
        if evidence is not None:
            overall, by_layer = evidence_retention(o.kept, evidence)
            o.extras = {**o.extras, "evidence_retention": overall, "evidence_retention_by_layer": by_layer}
        rows.append({
            **base, "keep_ratio": o.keep_ratio, "prediction": o.prediction, "score": float(task.score(o.prediction, sample)),
            "error": None, "context_tokens": o.context_tokens, "kept_tokens": o.kept_tokens, "kv_bytes": o.kv_bytes,
            "kv_bytes_full": o.kv_bytes_full, "prefill_s": o.prefill_s, "compress_s": o.compress_s,
            "decode_s": o.decode_s, "peak_mem_bytes": o.peak_mem_bytes, "budgets": o.budgets, **o.extras,
        })
    return rows


def _jsonable(meta: dict) -> dict:
    try:
        json.dumps(meta)
        return meta
    except TypeError:
        return json.loads(json.dumps(meta, default=str))
