"""Method registry. Every module in this package registers scorers and/or allocators on import
(``harness.compress.register_scorer`` / ``register_allocator``); ``build_method`` turns a ``method`` config
into a ``harness.compress.Method``. Adding a method = adding one file here and one yaml in conf/method/.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

from harness.compress import ALLOCATORS, SCORERS, BudgetRule, Method
from harness.errors import KvbenchError
from harness.schema import STRICT, Fraction, NonNegative, check_params, plain, to_error

# Keys of a method config read by the harness itself; the rest are scorer or allocator parameters.
COMMON_KEYS = {"name", "label", "scorer", "allocator", "n_sink", "n_recent", "recent_share", "preset", "budget_rule"}
# Allocator parameters every method config carries (so any method takes any allocator); unused ones are fine.
SHARED_KEYS = {"alpha", "beta", "profile"}
_loaded = False


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def _accepted(cls) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")}


class MethodKeys(BaseModel):
    """The keys of a method config that the harness reads itself (the selector's and the composition's)."""
    model_config = {**STRICT, "extra": "ignore"}
    name: Annotated[str, Field(min_length=1)]
    label: Annotated[str, Field(min_length=1)] | None = None
    scorer: Annotated[str, Field(min_length=1)] | None = None
    allocator: Annotated[str, Field(min_length=1)] | None = None
    preset: str | None = None
    n_sink: NonNegative | None = 0
    n_recent: NonNegative | None = 0
    recent_share: Fraction | None = 0.0
    # how ratios become counts (harness.compress.BudgetRule): null = floor; every kvpress preset sets kvpress
    budget_rule: BudgetRule | None = None


def _construct(kind: str, registry: dict, name: str, params: dict[str, Any], checked: dict[str, Any]):
    """The part ``name`` built from its own keys of ``params``; their checked values are added to ``checked``."""
    if not isinstance(name, str) or name not in registry:
        raise KvbenchError(f"method.{kind}={name!r} is not known; allowed: {', '.join(sorted(registry))}")
    cls = registry[name]
    # Each value is checked (type and range) against the class's annotated signature before it is built.
    own = check_params("method", cls, {k: v for k, v in params.items() if k in _accepted(cls)})
    checked.update(own)
    return cls(**own)


def build_method(cfg) -> Method:
    """A ``Method`` from a method config (a dict or an OmegaConf node)."""
    load_all()
    cfg = plain(cfg)
    if not isinstance(cfg, dict):
        raise KvbenchError("method= must be a config node (key: value)")
    cfg = dict(cfg)  # presets update it: never the caller's dict
    try:
        MethodKeys.model_validate(cfg)
    except ValidationError as err:
        raise to_error(err, cfg, prefix="method") from None
    scorer_name = cfg.get("scorer")
    allocator_name = cfg.get("allocator") or "uniform"
    if scorer_name and scorer_name not in SCORERS:
        raise KvbenchError(f"method.scorer={scorer_name!r} is not known; allowed: {', '.join(sorted(SCORERS))}")
    preset = cfg.get("preset")
    if preset:  # a preset sets its parameters (scorer's, selector's, budget_rule) over the yaml's
        presets = SCORERS[scorer_name].PRESETS if scorer_name else {}
        if preset not in presets:
            allowed = ", ".join(sorted(presets)) or "none for this method"
            raise KvbenchError(f"method.preset={preset!r} is not known for {cfg['name']}; allowed: {allowed}")
        cfg.update(presets[preset])
    params = {k: v for k, v in cfg.items() if k not in COMMON_KEYS}
    # A scorer that protects sinks itself (ExpectedAttention's statistics skip them) gets the selector's n_sink.
    scorer_params = {**params, "n_sink": int(cfg.get("n_sink") or 0)} if "n_sink" in cfg else params
    checked: dict[str, Any] = {}
    scorer = _construct("scorer", SCORERS, scorer_name, scorer_params, checked) if scorer_name else None
    allocator = _construct("allocator", ALLOCATORS, allocator_name, params, checked)
    used = set().union(*(_accepted(type(obj)) for obj in (scorer, allocator) if obj is not None))
    # A parameter of an allocator this method does not use (AdaKV's alpha, LKV's min_budget with uniform budgets)
    # may sit in its config: it is checked against its owner, not refused.
    scorer_keys = set().union(*(_accepted(cls) for cls in SCORERS.values()))
    spare = (set(params) - used) & (SHARED_KEYS | set().union(*(_accepted(cls) for cls in ALLOCATORS.values())))
    spare -= scorer_keys - SHARED_KEYS  # a scorer's key (window, ...) given to another scorer is still an error
    unknown = sorted(set(params) - used - spare)
    if unknown:
        raise KvbenchError(
            f"method.{unknown[0]} is not a parameter of scorer {scorer_name!r} or allocator {allocator_name!r}"
        )
    for key in sorted(spare):  # unused here, but a bad value is still refused
        owner = next(cls for cls in ALLOCATORS.values() if key in _accepted(cls))
        checked.update(check_params("method", owner, {key: params[key]}))
    label = cfg.get("label") or cfg["name"]
    if not cfg.get("label") and allocator_name != "uniform" and scorer is not None:
        label = f"{cfg['name']}+{allocator_name}"
    return Method(
        name=label,
        scorer=scorer,
        allocator=allocator,
        n_sink=int(cfg.get("n_sink") or 0),
        n_recent=int(cfg.get("n_recent") or 0),
        recent_share=float(cfg.get("recent_share") or 0.0),
        budget_rule=cfg.get("budget_rule") or "floor",
        config={**cfg, **checked},
    )


CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "method"


def config_names() -> list[str]:
    """The method configs of ``conf/method/`` (``method=<name>``)."""
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml") if not p.name.startswith("_"))


def config(name: str, **overrides: Any) -> dict:
    """A method's config as kvbench composes it: ``conf/method/_common.yaml``, then ``<name>.yaml``, then the
    overrides (``methods.config("snapkv", allocator="adakv")``)."""
    from omegaconf import OmegaConf

    path = CONF_DIR / f"{name}.yaml"
    if not path.exists():
        allowed = ", ".join(sorted(p.stem for p in CONF_DIR.glob("*.yaml") if not p.name.startswith("_")))
        raise KvbenchError(f"method={name!r} is not known; allowed: {allowed}")
    base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "_common.yaml"))
    own = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}
    return {**base, **own, **overrides}


def load(name: str, **overrides: Any) -> Method:
    """A ready ``Method`` by config name, for scripts and notebooks: ``methods.load("snapkv", preset="kvpress")``."""
    return build_method(config(name, **overrides))
