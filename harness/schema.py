"""The typed schema of a run config: every value is checked (type and range) before a run touches its dir.

``validate(cfg)`` turns a composed config (an OmegaConf node or a dict) into ``RunSettings`` or raises one
``KvbenchError`` naming the key, the bad value and what is allowed. The checks are pydantic models in strict
mode (a float is not an integer, a string is not a number, ``true`` is not a ratio), with one exception made on
purpose: booleans from the command line may be spelled true/false, yes/no or 1/0 (any case), and nothing else
(``overwrite=maybe`` and ``overwrite='False '`` are errors, not truthy strings).

Method parameters are checked the same way, from the annotated ``__init__`` signatures of the scorer and
allocator classes (``check_params``), so a new method declares its ranges where it declares its defaults.
"""
from __future__ import annotations

import math
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from pydantic_core import PydanticCustomError

from harness.errors import KvbenchError

TRUE = {"true", "yes", "1"}
FALSE = {"false", "no", "0"}


def parse_flag(value: Any) -> Any:
    """A strict boolean: bool, 0/1, or one of true/false, yes/no, 1/0 in any case; anything else is left as it is
    (and then rejected by the strict bool type)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        if value.lower() in TRUE:
            return True
        if value.lower() in FALSE:
            return False
    return value


def _as_list(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _unique(values: list[float]) -> list[float]:
    """Keep ratios once each, in the order given: ``[0.5, 0.5]`` is one budget (its rows share a key)."""
    out: list[float] = []
    for v in values:
        if all(abs(v - u) > 1e-9 for u in out):
            out.append(v)
    return out


Flag = Annotated[bool, BeforeValidator(parse_flag)]
Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _keep_ratio_range(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise PydanticCustomError("out_of_range", "out of range", {"allowed": "(0, 1] (1.0 = full cache)"})
    return value


KeepRatio = Annotated[float, AfterValidator(_keep_ratio_range)]


def _compression_ratio_range(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise PydanticCustomError("out_of_range", "out of range", {"allowed": "[0, 1) (0 = full cache)"})
    return value


# kvpress's spelling: the fraction removed (keep_ratio = 1 - compression_ratio)
CompressionRatio = Annotated[float, AfterValidator(_compression_ratio_range)]
DEFAULT_KEEP_RATIO = 0.5  # when neither keep_ratio nor compression_ratio is given

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ModelSettings(BaseModel):
    model_config = STRICT
    name: str
    family: Literal["llama", "qwen2", "qwen3", "mistral", "phi3"] | None = None
    path: Annotated[str, Field(min_length=1)] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")] = "auto"
    # null: the weights load onto ``device``; auto: accelerate spreads them over the GPUs (harness.models.placement)
    device_map: Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")] | None = None
    chat: Flag = False
    seed: NonNegative = 0


class TaskSettings(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # task parameters: checked by the task
    name: Annotated[str, Field(min_length=1)]
    data_dir: Annotated[str, Field(min_length=1)] | None = None
    exclude: list[str] = []
    depth: Annotated[float, Field(ge=0.0, le=100.0)] | None = None  # needle depth in percent (RULER niah)


class DecodingSettings(BaseModel):
    """``decoding:``: compression while decoding (``harness.decoding``); resolved into a
    ``harness.compress.DecodingPlan`` by ``DecodingSettings.plan``."""
    model_config = STRICT
    # prefill: compressed once after the prefill; decode: prefill kept whole, cut while decoding; both.
    # null: both when target_size is set, else prefill.
    mode: Literal["prefill", "decode", "both"] | None = None
    target_size: Count | None = None  # entries per KV head decoding cuts back to (null: the keep ratio's budget)
    compression_interval: Count = 512  # decoding steps between cuts (kvpress's default)
    query_buffer: Count = 256  # most recent queries the scorer sees (kvpress's hidden_states_buffer_size)
    query_positions: Literal["own", "last"] = "own"  # last: rotated to the current position, as kvpress does

    def plan(self):
        from harness.compress import DecodingPlan

        mode = self.mode or ("both" if self.target_size is not None else "prefill")
        if mode == "prefill" and self.target_size is not None:
            raise KvbenchError(f"decoding.target_size={self.target_size} is for compression while decoding; "
                               "decoding.mode=prefill compresses only after the prefill (allowed: decode, both)")
        return DecodingPlan(mode=mode, target_size=self.target_size, compression_interval=self.compression_interval,
                            query_buffer=self.query_buffer, query_positions=self.query_positions)


class RunSettings(BaseModel):
    """The top-level keys of ``conf/config.yaml`` (the method node is checked by ``methods.build_method``)."""
    model_config = STRICT
    # After ``validate``: the keep ratios to run (from keep_ratio, or 1 - compression_ratio; the two exclude each
    # other; neither = DEFAULT_KEEP_RATIO); compression_ratio stays as typed, or None.
    keep_ratio: Annotated[list[KeepRatio], BeforeValidator(_as_list), Field(min_length=1)] | None = None
    compression_ratio: Annotated[list[CompressionRatio], BeforeValidator(_as_list), Field(min_length=1)] | None = None
    context_length: Count
    n_samples: Count | None  # None: every sample of a task with a fixed set of records (LongBench)
    seed: NonNegative
    query_aware: Flag
    max_new_tokens: Count | None = None
    # >1: each context is prefilled and compressed once, then that many questions are answered about it, each
    # from its own copy of the pruned cache (query-agnostic by construction; n_samples counts contexts)
    questions_per_context: Count = 1
    # generations decoded together (each sample is prefilled and cut alone; harness/batching.py); rows do not
    # depend on it, so a run may resume under another batch size
    batch_size: Count = 1
    overwrite: Flag = False
    progress: Flag = True
    decoding: DecodingSettings = DecodingSettings()
    model: ModelSettings
    task: TaskSettings
    method: dict[str, Any]
    paper: dict[str, Any] | None = None


RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "out_of_range",
                "literal_error", "string_pattern_mismatch"}


def _allowed(error: dict) -> str:
    """What a pydantic error says is allowed, in the CLI's words."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if "allowed" in ctx:
        return str(ctx["allowed"])
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}
    if kind in bounds:
        return bounds[kind].format(**ctx)
    if kind == "literal_error":
        return str(ctx.get("expected", ""))
    if kind == "bool_type":
        return "true/false, yes/no or 1/0"
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return "an integer"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return "a finite number"
    if kind in ("string_type", "string_too_short"):
        return "a non-empty string"
    if kind == "string_pattern_mismatch":
        return "auto, cpu, cuda, cuda:N or mps"
    if kind == "too_short":
        return "a non-empty list"
    if kind == "list_type":
        return "a list"
    if kind in ("dict_type", "model_type"):
        return "a config node (key: value)"
    return error["msg"]


def _path(loc: tuple, prefix: str) -> str:
    # list positions (keep_ratio.1) name the key, not the index; tagged unions add type names that are noise
    parts = [str(p) for p in loc if not isinstance(p, int) and not str(p).startswith(("function-", "list["))]
    parts = [p for p in parts if p not in ("int", "float", "str", "bool", "none", "constrained-int")]
    return ".".join(([prefix] if prefix else []) + parts)


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value).replace("True", "true").replace("False", "false").replace("None", "null")


def to_error(err: ValidationError, values: dict, prefix: str = "", known: typing.Iterable[str] = ()) -> KvbenchError:
    """The first problem of a pydantic error as one line: ``key=value is ...; allowed: ...``."""
    first = err.errors()[0]
    key = _path(first["loc"], prefix)
    if first["type"] == "missing":
        return KvbenchError(f"{key} is required")
    if first["type"] == "extra_forbidden":
        import difflib

        name = str(first["loc"][-1])
        near = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean {'.'.join(([prefix] if prefix else []) + [near[0]])}?" if near else ""
        return KvbenchError(f"{key} is not a parameter here{hint} (allowed: {', '.join(sorted(known))})")
    value = values
    for part in first["loc"]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
    if first["type"] in ("too_short", "string_too_short"):
        return KvbenchError(f"{key}={_shown(value)} is empty; allowed: {_allowed(first)}")
    problem = "is out of range" if first["type"] in RANGE_ERRORS else "has the wrong type"
    return KvbenchError(f"{key}={_shown(value)} {problem}; allowed: {_allowed(first)}")


def validate(cfg: Any) -> RunSettings:
    """``RunSettings`` from a composed run config, or a one-line ``KvbenchError``."""
    values = plain(cfg)
    if not isinstance(values, dict):
        raise KvbenchError("the run config is not a mapping of keys to values")
    try:
        settings = RunSettings.model_validate(values)
    except ValidationError as err:
        raise to_error(err, values, known=RunSettings.model_fields) from None
    if settings.compression_ratio is not None:
        if settings.keep_ratio is not None:
            raise KvbenchError(f"keep_ratio={_shown(values.get('keep_ratio'))} and compression_ratio="
                               f"{_shown(values.get('compression_ratio'))} exclude each other; give one "
                               "(keep_ratio = 1 - compression_ratio)")
        settings.compression_ratio = _unique(settings.compression_ratio)
        # computed in float as kvpress does, so the kvpress budget rule counts exactly int(T * (1 - cr))
        settings.keep_ratio = [1.0 - cr for cr in settings.compression_ratio]
    settings.keep_ratio = _unique(settings.keep_ratio or [DEFAULT_KEEP_RATIO])
    return settings


def plain(cfg: Any) -> Any:
    """An OmegaConf node as plain Python values (interpolations resolved); anything else as it is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


_SIGNATURES: dict[type, type[BaseModel]] = {}


def signature_model(cls: type) -> type[BaseModel]:
    """A strict pydantic model of ``cls.__init__``'s annotated keyword parameters (cached on the class)."""
    if cls in _SIGNATURES:
        return _SIGNATURES[cls]
    import inspect

    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    fields: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(name, Any)
        if annotation is bool or annotation == (bool | None):
            annotation = Flag if annotation is bool else Flag | None
        default = ... if param.default is param.empty else param.default
        fields[name] = (annotation, default)
    model = create_model(f"{cls.__name__}Params", __config__=STRICT, **fields)
    _SIGNATURES[cls] = model
    return model


def check_params(kind: str, cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked against ``cls``'s signature; ``kind`` names the part in errors (``method``)."""
    model = signature_model(cls)
    try:
        checked = model.model_validate(params)
    except ValidationError as err:
        raise to_error(err, params, prefix=kind, known=model.model_fields) from None
    values = dict(checked)  # the checked fields as they are (a model's iteration: field name, value)
    return {k: values[k] for k in params}


class TrainData(BaseModel):
    model_config = STRICT
    source: Literal["ruler", "synthetic", "text", "random"] = "ruler"
    tasks: list[Annotated[str, Field(min_length=1)]] = []
    path: Annotated[str, Field(min_length=1)] | None = None
    context_length: Annotated[list[Count], BeforeValidator(_as_list), Field(min_length=1)]
    seed: NonNegative = 1_000_000
    target: Literal["teacher", "answer"] = "teacher"
    max_new_tokens: Count = 16
    continuation: Count = 64


class LKVTrain(BaseModel):
    model_config = STRICT
    width: Count = 32
    use_hidden: Flag = False
    mode: Literal["bias", "throttle", "both"] = "bias"
    temp: Positive = 1.0
    budget_weight: NonNegativeFloat = 1.0
    learn_budgets: Flag = True


class SPKVTrain(BaseModel):
    model_config = STRICT
    feature: Literal["hidden", "key"] = "hidden"
    init_bias: float = 6.0
    sparsity_weight: NonNegativeFloat = 0.2
    sparsity_target: Fraction | None = None
    train_params: list[str] = []


class TrainSettings(BaseModel):
    """The keys of ``conf/train.yaml`` (kvbench-train)."""
    model_config = STRICT
    out: Annotated[str, Field(min_length=1)] | None = None
    overwrite: Flag = False
    steps: Count
    lr: Positive | None = None
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: Positive | None = None
    save_every: Count = 25
    keep_ratios: Annotated[list[KeepRatio], BeforeValidator(_as_list), Field(min_length=1)]
    ce_weight: NonNegativeFloat = 1.0
    kl_weight: NonNegativeFloat = 1.0
    seed: NonNegative = 0
    threads: Count = 1
    progress: Flag = True
    data: TrainData
    lkv: LKVTrain = LKVTrain()
    spkv: SPKVTrain = SPKVTrain()
    model: ModelSettings
    method: dict[str, Any]


def validate_train(cfg: Any) -> TrainSettings:
    """``TrainSettings`` from a composed kvbench-train config, or a one-line ``KvbenchError``."""
    values = plain(cfg)
    try:
        return TrainSettings.model_validate(values)
    except ValidationError as err:
        raise to_error(err, values, known=TrainSettings.model_fields) from None
