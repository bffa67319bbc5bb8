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
from dataclasses import dataclass, field
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
from harness.io import RowStore, atomic_write_json, atomic_write_text, os_error
from harness.lock import RunLock
from harness.metrics import summarize
from harness.models import inspect_model, load_model, sliding_window
from harness.batching import DecodeBatch
from harness.pipeline import run_questions, run_sample
from harness.schema import RunSettings, validate
from tasks.base import PromptEncoder

log = logging.getLogger("kvbench")


class RowCounter:
    """Rows written by this process, over all runs of a sweep (for the interrupt message)."""
    written = 0

# Keys that may change between a run and its resumption without changing its rows.
VOLATILE_KEYS = ("overwrite", "output_dir", "progress", "paper", "batch_size")  # paper: published numbers, not run
# inputs; batch_size: rows are the same at any batch size


# Keys added since run dirs were first written, with the value an older dir's rows were made with: a dir whose
# config lacks one still resumes under that value.
ADDED_KEYS = {"questions_per_context": 1,
              "decoding": {"mode": "prefill", "target_size": None, "compression_interval": 512, "query_buffer": 256,
                           "query_positions": "own"}}


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in VOLATILE_KEYS and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}


def normalized(cfg: DictConfig, settings: RunSettings, method=None) -> dict:
    """The resolved config with the validated spellings (``query_aware=yes`` is stored as true), so that two
    spellings of one config are one config. ``compression_ratio=0.9`` is stored as ``keep_ratio: 0.1`` (every
    budget rule counts the same for both spellings: ``harness.compress.kept_fraction``)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if method is not None:  # the method's own values as checked (a preset's values are not written in)
        resolved["method"] = {k: method.config.get(k, v) for k, v in resolved["method"].items()}
    resolved.update(settings.model_dump(include={"query_aware", "overwrite", "progress"}))
    resolved.pop("compression_ratio", None)
    resolved["keep_ratio"] = [recorded_ratio(r) for r in settings.keep_ratio]
    if "decoding" in resolved:  # the mode as resolved: mode=null with a target is mode=both
        resolved["decoding"] = {**resolved["decoding"], "mode": settings.decoding.plan().mode}
    resolved["model"]["chat"] = settings.model.chat
    if resolved["model"].get("device_map", "absent") is None:  # added later: left unset, a dir made before resumes
        del resolved["model"]["device_map"]
    typed = cfg.get("keep_ratio") if cfg.get("compression_ratio") is None else cfg.get("compression_ratio")
    if not isinstance(typed, (list, tuple, ListConfig)):
        resolved["keep_ratio"] = resolved["keep_ratio"][0]
    return resolved


def recorded_ratio(ratio: float) -> float:
    """A ratio as rows and configs record it: 12 decimals, so 1 - 0.9 is 0.1, not 0.09999999999999998 (the
    run itself counts with the exact value)."""
    return round(float(ratio), 12)


def _read_config(path: Path) -> dict:
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        previous = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, UnicodeDecodeError, YAMLError, OmegaConfBaseException) as err:
        raise KvbenchError(f"{path} is not a readable config ({type(err).__name__}); fix it, or pass "
                           "overwrite=true to discard that run") from None
    if not isinstance(previous, dict):
        raise KvbenchError(f"{path} is not a config mapping; fix it, or pass overwrite=true to discard that run")
    return previous


def prepare_dir(out_dir: Path, cfg: DictConfig, inputs: dict | None = None, settings: RunSettings | None = None,
                method=None) -> None:
    """Create the run dir, or check that an existing one was made by the same config and the same input files
    (``inputs``: fingerprints of the model weights and method files, see harness/fingerprint.py)."""
    settings = settings or validate(cfg)
    resolved = normalized(cfg, settings, method)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise os_error(err, out_dir) from None
    if not os.access(out_dir, os.W_OK):
        raise KvbenchError(f"output dir {str(out_dir)!r} is not writable; pass hydra.run.dir=<dir>")
    config_path = out_dir / "config.yaml"
    if config_path.exists() and not settings.overwrite:
        previous = _read_config(config_path)
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
    for name in ("config.yaml", "metrics.json"):  # temp files of writes a SIGKILL cut short (the dir is locked)
        for stale in out_dir.glob(f".{name}.*"):
            stale.unlink(missing_ok=True)
    if settings.overwrite:
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


def check_config(cfg: DictConfig, model_files: bool = True) -> tuple[RunSettings, Any, dict]:
    """Every value of a run config checked, nothing loaded or written: the settings, the method, the tasks (built,
    by name, in run order; no data read yet).
    The model is checked from its config.json alone (architecture, maximum context), before any weight loads.
    The CLI calls it for each job before Hydra makes a dir; ``run`` calls it again first."""
    settings = validate(cfg)
    known = methods.config_names()
    if known and str(cfg.method.get("name")) not in known:  # a renamed method would label rows with another name
        raise KvbenchError(f"method.name={cfg.method.get('name')!r} is not a method config; allowed: "
                           f"{', '.join(known)} (method.label=<text> renames a method in rows and reports)")
    method = methods.build_method(cfg.method, settings.decoding.plan())
    if method.rerotate_keys and method.scorer is not None and method.compresses:
        uneven = [r for r in settings.keep_ratio if r < 1.0 and method.scorer.varies_layer_counts(r)]
        if uneven:
            raise KvbenchError(f"method.rerotate_keys=true needs one kept count in every layer; scorer "
                               f"{method.scorer.registered_name} keeps a different count per layer at keep_ratio="
                               f"{recorded_ratio(uneven[0])} (drop method.rerotate_keys)")
    task_names = suite_tasks(cfg.task)
    built = build_tasks(cfg, task_names)  # every task option checked here, before any dir is made
    if settings.questions_per_context > 1:
        check_questions(settings, built)
    facts = inspect_model(cfg.model) if model_files else {}
    limit = facts.get("max_position_embeddings")
    if limit and settings.context_length > limit:
        raise KvbenchError(
            f"context_length={settings.context_length} is larger than the model's maximum ({limit} positions)"
        )
    for name, task in built.items():
        longest = max(task.lengths(settings.context_length))
        if limit and longest > limit:
            raise KvbenchError(f"{name}: context length {longest} is larger than the model's maximum ({limit} "
                               f"positions); use lengths up to {limit}")
    window = facts.get("sliding_window")
    if window is not None and settings.context_length + (settings.max_new_tokens or 0) > window:
        raise KvbenchError(
            f"context_length={settings.context_length} (+ max_new_tokens={settings.max_new_tokens or 0}) is longer "
            f"than the model's sliding window ({window} positions), which kvbench's attention does not apply: "
            f"use lengths up to {window} (docs/models.md)")
    return settings, method, built


def build_tasks(cfg: DictConfig, task_names: list[str]) -> dict:
    """The tasks of a run by name, built with the task node's options (a suite's data_dir goes to the members
    that read data). Building checks the options and data dir; no data is read yet."""
    built = {}
    for name in task_names:
        suite = None if name == cfg.task.name else str(cfg.task.name)  # a suite's data_dir is for those that read
        built[name] = tasks.get_task(name, suite=suite, **task_params(cfg.task))
    return built


def check_questions(settings: RunSettings, built: dict) -> None:
    """``questions_per_context=K > 1``: query-agnostic, and every task's contexts carry K questions."""
    k = settings.questions_per_context
    if settings.query_aware:
        raise KvbenchError(f"questions_per_context={k} compresses each context once for all its questions, so the "
                           "question cannot be prefilled with it; pass query_aware=false (or questions_per_context=1)")
    for name, task in built.items():
        limit = task.max_questions_per_context()
        if limit is not None and k > limit:
            carried = "one question each" if limit == 1 else f"at most {limit} different questions each"
            raise KvbenchError(f"questions_per_context={k} is more than the contexts of {name} carry ({carried}); "
                               f"allowed: 1..{limit}")


def check_protected(method, settings: RunSettings) -> None:
    """Sinks + recent window larger than every budget run: the method would keep only protected tokens at every
    ratio (its scores never matter), which is a wrong config, not a result."""
    from harness.compress import n_keep

    protected = method.selector.protected
    budgets = [n_keep(settings.context_length, r, method.budget_rule) for r in settings.keep_ratio if r < 1.0]
    if method.compresses and budgets and protected >= max(budgets):
        raise KvbenchError(
            f"method.selector.n_sink + method.selector.n_recent = {protected} protected tokens is at least every "
            f"budget of this run (at most {max(budgets)} tokens at context_length={settings.context_length}); lower "
            "method.selector.n_recent / method.selector.n_sink or raise keep_ratio / context_length"
        )


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run one config into ``out_dir``; returns the metrics. Every value is checked before the dir is touched,
    and the dir is locked for the whole run (a second run on it is refused at once)."""
    out_dir = Path(out_dir)
    settings, method, built = check_config(cfg)
    empty_before = not out_dir.exists() or not any(out_dir.iterdir())
    try:
        with RunLock(out_dir):
            return _run_locked(cfg, settings, method, built, out_dir)
    except KvbenchError:
        # refused before anything was written (bad data found while loading samples): leave no empty run dir
        # behind, the one Hydra or the lock made for this run
        if empty_before and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _run_locked(cfg: DictConfig, settings: RunSettings, method, built: dict, out_dir: Path) -> dict:
    ratios = settings.keep_ratio
    torch.manual_seed(settings.seed)
    model, tokenizer = load_model(cfg.model)
    method.bind_model(model)  # a checkpoint or profile made for another model is refused
    # Load every task's samples before writing anything: bad data fails the run before it touches the dir.
    limit = getattr(model.config, "max_position_embeddings", None)
    loaded = []
    for name, task in built.items():  # the tasks check_config built and checked
        encoder = PromptEncoder.for_task(tokenizer, task, settings.model.chat)
        if settings.questions_per_context > 1:
            samples = task.question_samples(encoder, settings.context_length, settings.n_samples,
                                            settings.questions_per_context, settings.seed)
        else:
            samples = task.samples(encoder, settings.context_length, settings.n_samples, settings.seed)
        for sample in samples:
            n_tokens, length = encoder.count_sample(sample), sample_length(sample, settings)
            if limit and length > limit:
                raise KvbenchError(f"{name}: context length {length} of sample {sample.sample_id} is larger than "
                                   f"the model's maximum ({limit} positions); use lengths up to {limit}")
            window = getattr(model.config, "sliding_window", None) if sliding_window(model.config) else None
            generated = settings.max_new_tokens or sample.max_new_tokens
            if window is not None and n_tokens + generated > window:
                raise KvbenchError(f"{name}: sample {sample.sample_id}'s {n_tokens} prompt tokens + {generated} new "
                                   f"tokens are longer than the model's sliding window ({window} positions), which "
                                   "kvbench's attention does not apply; lower context_length or max_new_tokens")
            if n_tokens > length:
                raise KvbenchError(
                    f"context_length={length} is smaller than the prompt of {name} "
                    f"({n_tokens} tokens for sample {sample.sample_id}); raise context_length"
                )
        loaded.append((name, task, encoder, samples))
    check_protected(method, settings)
    prepare_dir(out_dir, cfg, run_inputs(model, method.parts), settings, method)
    store = RowStore(out_dir / "predictions.jsonl")
    label = model_label(cfg.model)
    if not method.shares_across_ratios and len(ratios) > 1:
        log.info("%s cannot share a prefill across keep ratios: one prefill per ratio", method.name)
    total = sum(len(s) for _, _, _, s in loaded)
    bar = tqdm(total=total, desc=f"{method.name} {cfg.task.name}", disable=not settings.progress)
    try:
        with install(model) as hooks:
            batch = (DecodeBatch(model, tokenizer, hooks, method, settings.batch_size, settings.seed)
                     if settings.batch_size > 1 else None)
            for name, task, encoder, samples in loaded:
                waiting: list[tuple[list, _Pending | None]] = []
                groups = context_groups(samples)
                for k, group in enumerate(groups):
                    # a ratio is run when any question of the context lacks its row (written rows are kept)
                    todo = [r for r in ratios
                            if any(RowStore.key({"task": name, "sample_id": s.sample_id, "method": method.name,
                                                 "keep_ratio": r}) not in store.done for s in group)]
                    waiting.append((group, _begin_rows(settings, model, tokenizer, hooks, method, name, encoder,
                                                       group, todo, label, task.stop_strings(), batch)
                                    if todo else None))
                    if batch is None or len(waiting) >= settings.batch_size or k == len(groups) - 1:
                        _write_rows(store, waiting, batch, task, method, settings.batch_size, bar)
                        waiting = []
    finally:
        bar.close()  # ends the bar's line, so an interrupt message starts on its own line
    metrics = summarize(store.rows)
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def _write_rows(store: RowStore, waiting: list, batch: DecodeBatch | None, task, method, batch_size: int,
               bar) -> None:
    """Decode what the batch holds (every context of ``waiting`` then has its outcomes) and append their rows, in
    sample order; a failing batch fails the rows of each context in it, not the sweep."""
    if batch is not None and len(batch):
        try:
            batch.flush()
        except SAMPLE_ERRORS as err:
            for _, pending in waiting:
                if pending is not None and pending.failed is None:
                    _fail(pending, method, err)
    for group, pending in waiting:
        if pending is not None:
            before = len(store.rows)
            store.append(_finish_rows(pending, task, method, batch_size))
            RowCounter.written += len(store.rows) - before
        bar.update(len(group))


def context_groups(samples: list) -> list[list]:
    """Consecutive samples sharing ``meta["context_id"]`` (several questions about one context), each other
    sample alone."""
    groups: list[list] = []
    for s in samples:
        cid = s.meta.get("context_id")
        if cid is not None and groups and groups[-1][0].meta.get("context_id") == cid:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


@dataclass
class _Pending:
    """One context's rows in the making: its samples' row bases, their outcomes per ratio (filled by the
    pipeline now, or by the batch's flush), or the rows of its failure."""

    group: list
    ratios: list[float]
    bases: list[dict]
    evidence: list
    outcomes: list = field(default_factory=list)
    failed: list[dict] | None = None


def _begin_rows(settings: RunSettings, model, tokenizer, hooks, method, name, encoder, group, ratios, label,
                stop_strings: list[str], batch: DecodeBatch | None) -> _Pending:
    """One context's samples (one sample, or the questions of ``questions_per_context``) prefilled, cut and, without
    ``batch``, decoded."""
    first = group[0]
    encoded = [encoder.encode_sample(s) for s in group]
    ctx_ids = encoded[0][0]
    if any(c != ctx_ids for c, _ in encoded[1:]):  # one prefill serves the group: its contexts must be one
        raise KvbenchError(f"{name}: the questions of context {first.meta.get('context_id')} do not share one "
                           "context (a task bug); run with questions_per_context=1")
    max_new = settings.max_new_tokens or first.max_new_tokens
    bases = []
    for s in group:
        base = {
            "task": name, "sample_id": s.sample_id, "method": method.name, "model": label,
            "context_length": sample_length(s, settings), "seed": settings.seed, "query_aware": settings.query_aware,
            "answers": list(s.answers), "meta": _jsonable(s.meta),
        }
        if "context_id" in s.meta:
            base.update({"context_id": s.meta["context_id"], "question_index": s.meta.get("question_index"),
                         "questions_per_context": len(group)})
        bases.append(base)
    evidence = [encoder.context_token_indices(s.context, s.meta["evidence"]) if s.meta.get("evidence") else None
                for s in group]
    pending = _Pending(group, ratios, bases, evidence)
    keep_indices = any(e is not None for e in evidence)
    mark = batch.mark() if batch is not None else 0
    try:
        if len(group) == 1:
            pending.outcomes = [run_sample(model, tokenizer, hooks, method, ctx_ids, encoded[0][1], ratios,
                                           settings.query_aware, max_new, stop_strings, seed=settings.seed,
                                           keep_indices=keep_indices, batch=batch)]
        else:
            pending.outcomes = run_questions(model, tokenizer, hooks, method, ctx_ids, [q for _, q in encoded], ratios,
                                             max_new, stop_strings, seed=settings.seed, keep_indices=keep_indices,
                                             batch=batch)
    except SAMPLE_ERRORS as err:
        if batch is not None:
            batch.discard_after(mark)  # none of this context's cuts is decoded
        _fail(pending, method, err)
    return pending


# What ends one sample (CUDA OOM, a generation error), not the sweep: it is recorded in its rows.
SAMPLE_ERRORS = (RuntimeError, torch.cuda.OutOfMemoryError, ValueError, IndexError)


def _fail(pending: _Pending, method, err: BaseException) -> None:
    log.warning("sample %s failed: %s", pending.group[0].sample_id, _error_text(err))
    log.debug(traceback.format_exc())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    pending.failed = [{**base, **_ratio_fields(r), **method.decoding.row_fields(), "prediction": None, "score": None,
                       "error": _error_text(err)} for base in pending.bases for r in pending.ratios]


def _finish_rows(pending: _Pending, task, method, batch_size: int) -> list[dict]:
    """The rows of one context, once its generations are decoded."""
    if pending.failed is not None:
        return pending.failed
    rows = []
    for s, base, marked, per_ratio in zip(pending.group, pending.bases, pending.evidence, pending.outcomes):
        for o in per_ratio:
            extras = o.extras
            if marked is not None:
                overall, by_layer = evidence_retention(o.kept, marked)
                extras = {**extras, "evidence_retention": overall, "evidence_retention_by_layer": by_layer}
            added = task.prediction_meta(o.prediction, s)
            rows.append({
                **base, **({"meta": {**base["meta"], **_jsonable(added)}} if added else {}),
                **_ratio_fields(o.keep_ratio), "prediction": o.prediction,
                "score": float(task.score(o.prediction, s)), "error": None, "context_tokens": o.context_tokens,
                "kept_tokens": o.kept_tokens, "kv_bytes": o.kv_bytes, "kv_bytes_full": o.kv_bytes_full,
                "prefill_s": o.prefill_s, "compress_s": o.compress_s, "decode_s": o.decode_s,
                "peak_mem_bytes": o.peak_mem_bytes, "budgets": o.budgets, "batch_size": batch_size,
                **method.decoding.row_fields(), **o.footprint, **extras,
            })
    return rows


def sample_length(sample, settings: RunSettings) -> int:
    """The context length a sample was built for: ``meta["context_length"]`` (a task may build several lengths in
    one run, e.g. a NIAH length x depth grid), else the run's ``context_length``. Its prompt must fit it."""
    length = sample.meta.get("context_length")
    return int(length) if isinstance(length, int) and not isinstance(length, bool) and length > 0 \
        else settings.context_length


def _ratio_fields(keep_ratio: float) -> dict:
    """A row's ratios: ``keep_ratio`` (the resume key) and kvpress's ``compression_ratio = 1 - keep_ratio``."""
    return {"keep_ratio": recorded_ratio(keep_ratio), "compression_ratio": recorded_ratio(1.0 - keep_ratio)}


def _jsonable(meta: dict) -> dict:
    try:
        json.dumps(meta)
        return meta
    except TypeError:
        return json.loads(json.dumps(meta, default=str))
