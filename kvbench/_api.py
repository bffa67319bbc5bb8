"""The implementation of kvbench's public API (see ``kvbench/__init__.py`` and README "Use it as a library")."""
from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import conf
from harness.cli import SweepFailed
from harness.compress import Method
from harness.errors import KvbenchError
from tasks.base import Sample

if TYPE_CHECKING:
    import torch

# Whether a tokenizer ``load_model`` returned was configured to use its chat template (``model.chat``).
_CHAT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the commands: nothing is downloaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_config_dir(path: str | os.PathLike) -> None:
    """Add a dir of your own configs (``method/<name>.yaml``, ``task/...``, ``model/...``) after kvbench's: its
    names become valid in ``method``, ``load_model``, ``samples`` and ``run``, as ``kvbench --config-dir DIR``
    makes them for one command. A name kvbench's own configs use is refused (give yours its own name)."""
    conf.add_dir(path)


def methods() -> list[str]:
    """The method config names (``method=<name>``), yours included."""
    return conf.options("method")


def models() -> list[str]:
    """The model config names (``model=<name>``); ``load_model`` also takes a checkpoint dir."""
    return conf.options("model")


def tasks() -> list[str]:
    """The task and suite config names (``task=<name>``)."""
    return conf.options("task")


def _compose(overrides: list[str]):
    from harness.overrides import Composer

    with Composer(conf.CONF_DIR, "config") as composer:
        return composer.compose(overrides)


def load_model(name_or_path: str | os.PathLike = "reference", **config: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)``, loaded as ``kvbench model=...`` loads them.

    ``name_or_path``: a model config (``"reference"``, the shipped 1M-parameter Llama; ``"tiny-random"``, random
    weights) or a local Hugging Face checkpoint dir (``model=hf model.path=<dir>``: Llama, Qwen2, Qwen3,
    Mistral). ``config`` sets the model config's keys: ``dtype`` ("float32", "bfloat16", "float16"), ``device``
    ("auto", "cpu", "cuda:0", ...), ``chat`` (wrap prompts in the chat template, read by ``generate`` and
    ``samples``), ``family`` and ``seed`` (tiny-random). Bad values are one-line ``KvbenchError``\\ s."""
    from omegaconf import OmegaConf, open_dict

    from harness.models import load_model as load
    from harness.schema import validate

    _offline()
    text = os.fspath(name_or_path)
    named = text in models()
    cfg = _compose([f"model={text if named else 'hf'}"])
    if not named:
        with open_dict(cfg):
            cfg.model.path = text
    known = list(cfg.model.keys())
    for key, value in config.items():
        if key not in known or key == "name":
            raise KvbenchError(f"load_model: {key}={value!r} is not a key of model={cfg.model.name}; keys: "
                               f"{', '.join(k for k in known if k != 'name')}")
        OmegaConf.update(cfg, f"model.{key}", value, merge=False)
    settings = validate(cfg)
    model, tokenizer = load(cfg.model)
    try:
        _CHAT[tokenizer] = bool(settings.model.chat)
    except TypeError:  # a tokenizer that cannot be weakly referenced: generate falls back to its template
        pass
    return model, tokenizer


def _ratio(keep_ratio: float | None, compression_ratio: float | None) -> float | None:
    """A keep ratio checked as the command checks ``keep_ratio=`` / ``compression_ratio=``."""
    from pydantic import TypeAdapter, ValidationError

    from harness.schema import CompressionRatio, KeepRatio, to_error

    if keep_ratio is not None and compression_ratio is not None:
        raise KvbenchError(f"keep_ratio={keep_ratio} and compression_ratio={compression_ratio} exclude each other; "
                           "give one (keep_ratio = 1 - compression_ratio)")
    key, kind = ("compression_ratio", CompressionRatio) if compression_ratio is not None else ("keep_ratio", KeepRatio)
    value = compression_ratio if compression_ratio is not None else keep_ratio
    if value is None:
        return None
    try:
        checked = TypeAdapter(kind).validate_python(value, strict=False)
    except ValidationError as err:
        raise to_error(err, value, prefix=key) from None
    return 1.0 - checked if key == "compression_ratio" else float(checked)


def method(name: str, *overrides: str, keep_ratio: float | None = None, compression_ratio: float | None = None,
           decoding: dict[str, Any] | None = None, **params: Any) -> Method:
    """A ready ``Method`` from ``conf/method/<name>.yaml``, as ``kvbench method=<name>`` builds it.

    ``overrides`` are command-line overrides relative to ``method.`` (``"scorer.window=16"``,
    ``"allocator=adakv"``); ``params`` the short spelling: a method key (``preset="kvpress"``), a part by name
    (``allocator="adakv"``), a selector key (``n_recent=8``) or a parameter of the one part that takes it
    (``window=16``). ``keep_ratio`` (0.5 when neither is given, as on the command line; or kvpress's
    ``compression_ratio = 1 - keep_ratio``) is what ``compress`` and ``generate`` keep; it is stored on the method
    (``Method.keep_ratio``). ``decoding`` compresses while decoding too, with the keys of the command's
    ``decoding:`` (``{"target_size": 256, "compression_interval": 64}``; docs/decoding.md)."""
    import methods as registry
    from harness.schema import DEFAULT_KEEP_RATIO, DecodingSettings, to_error
    from pydantic import ValidationError

    if keep_ratio is None and compression_ratio is None:
        keep_ratio = DEFAULT_KEEP_RATIO
    ratio = _ratio(keep_ratio, compression_ratio)
    if decoding is not None and not isinstance(decoding, Mapping):
        raise KvbenchError(f"decoding={decoding!r} must be a mapping of decoding keys (allowed: "
                           f"{', '.join(DecodingSettings.model_fields)})")
    try:
        plan = DecodingSettings.model_validate(dict(decoding or {})).plan()
    except ValidationError as err:
        raise to_error(err, dict(decoding or {}), prefix="decoding", known=DecodingSettings.model_fields) from None
    built = registry.build_method(registry.config(name, *overrides, **params), plan)
    built.keep_ratio = ratio
    return built


def _method(spec: Method | str, keep_ratio: float | None) -> tuple[Method, float]:
    built = method(spec) if isinstance(spec, str) else spec
    if not isinstance(built, Method):
        raise KvbenchError(f"method must be a kvbench.method(...) or a method name, not {type(spec).__name__}")
    ratio = _ratio(keep_ratio, None) if keep_ratio is not None else built.keep_ratio
    if ratio is None:
        if built.compresses:
            raise KvbenchError(f"method {built.name} has no keep_ratio: build it with kvbench.method(..., "
                               "keep_ratio=) or pass keep_ratio=")
        ratio = 1.0
    return built, ratio


def samples(task: str, tokenizer, context_length: int = 1024, n_samples: int | None = 1, seed: int = 0,
            chat: bool | None = None, **task_config: Any) -> list[Sample]:
    """The samples ``kvbench task=<task> context_length=... n_samples=... seed=...`` runs, for one task (a
    suite's member such as ``"ruler/niah_single_1"``), laid out for ``tokenizer``; ``task_config`` sets the task
    config's keys (``data_dir``, ``depth``). Hand a sample to ``generate`` as ``sample.context,
    sample.question, answer_prefix=sample.answer_prefix``."""
    from omegaconf import OmegaConf

    import tasks as registry
    from harness.runner import task_params
    from tasks.base import PromptEncoder

    _offline()
    if task not in tasks():
        raise KvbenchError(f"task={task!r} is not known; allowed: {', '.join(tasks())}")
    cfg = _compose([f"task={task}"])
    known = list(cfg.task.keys())
    for key, value in task_config.items():
        if key not in known or key in ("name", "exclude"):
            raise KvbenchError(f"samples: {key}={value!r} is not a key of task={task}; keys: "
                               f"{', '.join(k for k in known if k not in ('name', 'exclude'))}")
        OmegaConf.update(cfg, f"task.{key}", value, merge=False)
    names = registry.expand(str(cfg.task.name))
    if names != [str(cfg.task.name)]:
        raise KvbenchError(f"task={task!r} is a suite; name one of its tasks: {', '.join(names)}")
    made = registry.get_task(str(cfg.task.name), **task_params(cfg.task))
    encoder = PromptEncoder(tokenizer, chat=_chat(tokenizer, chat) and not made.skip_chat_template)
    return made.samples(encoder, int(context_length), n_samples, int(seed))


def _chat(tokenizer, chat: bool | None) -> bool:
    """The command's rule: the chat template when the model config asks for it and the tokenizer has one."""
    wanted = _CHAT.get(tokenizer, True) if chat is None else bool(chat)
    return wanted and getattr(tokenizer, "chat_template", None) is not None


def _ids(tokenizer, context, question, answer_prefix: str, chat: bool | None) -> tuple[list[int], list[int]]:
    from tasks.base import PromptEncoder

    if isinstance(context, str) and isinstance(question, str):
        return PromptEncoder(tokenizer, chat=_chat(tokenizer, chat)).encode(context, question, answer_prefix)
    if isinstance(context, str) or isinstance(question, str):
        raise KvbenchError("generate: context and question are both text or both token ids")
    if answer_prefix:
        raise KvbenchError("generate: with token ids, end the question's ids with the answer prefix")
    as_list = lambda ids: [int(i) for i in (ids.flatten().tolist() if hasattr(ids, "flatten") else ids)]
    return as_list(context), as_list(question)


def generate(model, tokenizer, context: str | Sequence[int], question: str | Sequence[int] = "",
             method: Method | str = "full", max_new_tokens: int = 32, query_aware: bool = False, *,
             keep_ratio: float | None = None, answer_prefix: str = "", chat: bool | None = None,
             stop_strings: Sequence[str] = (), seed: int = 0, return_stats: bool = False) -> str | tuple[str, dict]:
    """The answer the ``kvbench`` command gives for one prompt: prefill, evict with ``method`` at its keep ratio,
    decode greedily (``harness.pipeline.run_sample``, the command's own path).

    ``context`` is what a query-agnostic run (``query_aware=False``, kvpress's convention) compresses before the
    ``question`` is seen; ``query_aware=True`` prefills and compresses both. Text is laid out as the command lays
    it out (``context + question + answer_prefix``, or the tokenizer's chat template, see ``load_model(chat=)``);
    token ids are used as they are. ``keep_ratio`` overrides the method's; ``stop_strings`` end the answer once
    it contains one (besides EOS); ``seed`` fixes the methods' randomness as ``seed=`` does.

    With ``return_stats=True``: ``(answer, stats)``, stats as a row of the command's predictions.jsonl has them:
    ``keep_ratio``, ``context_tokens``, ``kept_tokens`` (mean entries kept per head), ``budgets`` (per layer and
    KV head), ``kv_bytes`` (bytes of the pruned cache), ``kv_bytes_full``, ``prefill_s``, ``compress_s``,
    ``decode_s``, ``peak_mem_bytes`` and the method's own facts."""
    from harness.attention import install
    from harness.pipeline import run_sample

    built, ratio = _method(method, keep_ratio)
    ctx_ids, q_ids = _ids(tokenizer, context, question, answer_prefix, chat)
    if not ctx_ids:
        raise KvbenchError("generate: the context is empty")
    built.bind_model(model)  # a checkpoint or profile made for another model is refused
    with install(model) as hooks:
        (outcome,) = run_sample(model, tokenizer, hooks, built, ctx_ids, q_ids, [ratio], bool(query_aware),
                                int(max_new_tokens), list(stop_strings), seed=int(seed))
    if not return_stats:
        return outcome.prediction
    stats = {"keep_ratio": outcome.keep_ratio, "context_tokens": outcome.context_tokens,
             "kept_tokens": outcome.kept_tokens, "budgets": outcome.budgets, "kv_bytes": outcome.kv_bytes,
             "kv_bytes_full": outcome.kv_bytes_full, "prefill_s": outcome.prefill_s,
             "compress_s": outcome.compress_s, "decode_s": outcome.decode_s,
             "peak_mem_bytes": outcome.peak_mem_bytes, **built.decoding.row_fields(), **outcome.footprint,
             **outcome.extras}
    return outcome.prediction, stats


@dataclass
class Compression:
    """What ``compress`` yields: the method, its keep ratio, and facts of the last prefill it pruned."""

    method: Method
    keep_ratio: float
    n_tokens: int | None = None  # prompt tokens of the last prefill
    budgets: list[list[int]] | None = None  # per layer and KV head (empty for a method that keeps everything)
    kept_per_head: list[list[int]] | None = None  # entries each (layer, KV head) holds after pruning
    kv_bytes: int | None = None  # bytes of the pruned cache
    kv_bytes_full: int | None = None  # bytes of the cache before pruning
    _positions: Any = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def position(self, cache) -> int | None:
        """The position of the next token fed on ``cache`` (what ``position_ids`` must start at), None for a
        cache this block did not prefill."""
        return self._positions.get(cache)


def _first_tensor(args: tuple, kwargs: dict):
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if ids is not None else kwargs.get("inputs_embeds")


def _cache_arg(kwargs: dict):
    """The cache handed to a forward (``cache=`` in transformers >= 5.2x, ``past_key_values=`` before)."""
    from harness.compat import CACHE_ARG

    cache = kwargs.get(CACHE_ARG)
    return cache if cache is not None else kwargs.get("past_key_values")


@contextlib.contextmanager
def compress(model, method: Method | str, keep_ratio: float | None = None, seed: int = 0) -> Iterator[Compression]:
    """Inside the block, every forward of ``model`` that starts from an empty cache (a prefill,
    ``model(input_ids, past_key_values=cache, use_cache=True)``) leaves ``cache`` pruned in place by ``method``
    (at its keep ratio, or ``keep_ratio``), as the ``kvbench`` command prunes it; heads that keep different
    numbers of entries (AdaKV, LKV, LU-KV, SP-KV) hold ragged layers. Decode on it with your own loop inside the
    block: forwards on a pruned cache get the right positions (``position_ids`` continue after the prompt unless
    you pass your own) and attention over ragged layers. Batch size 1. Yields a ``Compression``.

    ::

        cache = DynamicCache()
        with kvbench.compress(model, kvbench.method("snapkv", keep_ratio=0.25)) as press:
            out = model(input_ids, past_key_values=cache, use_cache=True)   # T tokens -> floor(T / 4) per head
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(16):
                out = model(token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
    """
    import torch

    from harness.attention import install
    from harness.cache import cache_bytes, kept_per_head, prune
    from harness.compat import cache_of
    from harness.pipeline import full_cache_bytes

    built, ratio = _method(method, keep_ratio)
    if built.decoding.compresses_decoding:
        raise KvbenchError(f"compress: method {built.name} compresses while decoding (decoding.mode="
                           f"{built.decoding.mode}), which needs kvbench.generate's decoding loop; build it without "
                           "decoding= for your own loop")
    built.bind_model(model)
    state = Compression(built, ratio)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    prefill: list[contextlib.ExitStack] = []  # the scoring context of the prefill under way
    decoding = contextlib.ExitStack()  # the methods' decode patches of the caches pruned so far

    def before(module, args, kwargs):
        ids = _first_tensor(args, kwargs)
        cache = _cache_arg(kwargs)
        if ids is None or (cache is not None and cache.get_seq_length() > 0):
            position = state._positions.get(cache) if cache is not None else None
            if ids is not None and position is not None and kwargs.get("position_ids") is None:
                kwargs["position_ids"] = torch.arange(position, position + ids.shape[1], device=ids.device)[None]
            return args, kwargs
        if ids.shape[0] != 1:
            raise KvbenchError(f"kvbench.compress: batch size 1 only (got {ids.shape[0]} prompts)")
        stack = contextlib.ExitStack()
        stack.enter_context(hooks.scoring(built.scorer, seed, built.allocator))
        if built.scorer is not None:
            # the user's prompt (no ids when the model is fed embeddings); no question split is known
            built.scorer.begin_prefill([] if ids.is_floating_point() else ids[0].tolist(), 0)
            stack.enter_context(built.scorer.prefill_patch(model, ratio))
        prefill.append(stack)
        return args, kwargs

    def after(module, args, kwargs, output):
        ids = _first_tensor(args, kwargs)
        if not prefill:  # a decoding step: the next position moves on
            cache = _cache_arg(kwargs)
            if cache is not None and ids is not None and cache in state._positions:
                state._positions[cache] += ids.shape[1]
            return output
        stack = prefill.pop()
        scores = list(hooks.scores)
        stack.close()
        cache = cache_of(output)
        if cache is None:
            return output  # use_cache=False: nothing is kept, nothing to prune
        n_tokens = int(ids.shape[1])
        state.kv_bytes_full = full_cache_bytes(cache, n_tokens)
        if built.compresses:
            rescored = built.scorer.after_prefill(model, cache, ids[0].tolist())  # KVzip's reconstruction
            scores = scores if rescored is None else [None if s is None else s.float() for s in rescored]
            budgets, kept = built.plan(built.scorer.finish_prefill(scores), ratio)
            cache.layers[:] = prune(cache, kept, built.merge, built.key_channels(ratio)).layers
            state.budgets = budgets.tolist()
            decoding.enter_context(built.scorer.decode_patch(model, cache))
        else:
            state.budgets = []
        state.n_tokens, state.kept_per_head, state.kv_bytes = n_tokens, kept_per_head(cache), cache_bytes(cache)
        state._positions[cache] = n_tokens
        return output

    with install(model) as hooks, decoding:
        handles = [decoder.register_forward_pre_hook(before, with_kwargs=True),
                   decoder.register_forward_hook(after, with_kwargs=True)]
        try:
            yield state
        finally:
            for handle in handles:
                handle.remove()
            for stack in prefill:
                stack.close()


def run(overrides: Sequence[str]) -> dict:
    """``kvbench <overrides>`` in this process, for scripted sweeps: the same checks, run dirs (``./results/...``
    by default, ``hydra.run.dir=`` / ``hydra.sweep.dir=``), rows and errors as the command (it is the command's own
    code, ``harness.cli.execute``); ``"-m"`` in the list makes it a sweep. Returns ``{"runs": [{"dir",
    "overrides", "metrics"}, ...], "failed": []}``. Bad input raises ``KvbenchError`` with the line the command
    prints, before any dir is touched; a sweep some of whose jobs failed raises ``SweepFailed`` (a
    ``KvbenchError``) after the others finished, its ``result`` the dict. Methods and tasks you registered in this process (your own
    ``register_scorer`` / ``tasks.register``) and your config dirs (``add_config_dir``) are available to it."""
    from harness.cli import execute

    if isinstance(overrides, str):
        raise KvbenchError("kvbench.run takes a list of overrides, e.g. ['method=snapkv', 'keep_ratio=0.25']")
    return execute(list(overrides))
