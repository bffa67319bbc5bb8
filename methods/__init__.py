"""Method registry. Every module in this package registers scorers and/or allocators on import
(``harness.compress.register_scorer`` / ``register_allocator``); ``build_method`` turns a ``method`` config
into a ``harness.compress.Method``. Adding a method = adding one file here and one yaml in conf/method/.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import pkgutil
from typing import Any

from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

import conf
from harness.compress import ALLOCATORS, PREFILL_ONLY, SCORERS, BudgetRule, DecodingPlan, Method, Selector, WrappedScorer
from harness.errors import KvbenchError
from harness.schema import STRICT, Count, Flag, Fraction, NonNegative, check_params, to_error

# A method config (conf/method/<name>.yaml) is nested by part; each part receives only its own keys:
#   name, label, preset, budget_rule      the method's own keys
#   scorer:    {name: <registered scorer>, <its parameters>}     (absent or null: nothing is evicted)
#   allocator: {name: <registered allocator>, <its parameters>}  (absent or null: uniform)
#   selector:  {n_sink, n_recent, recent_share}                  (harness.compress.Selector)
# A part's parameters are its class's ``__init__`` keywords (conf/method/{scorer,allocator}/<name>.yaml list
# them with the class's defaults). A part may be given by name alone (``scorer: snapkv``): class defaults.
PART_KINDS = {"scorer": SCORERS, "allocator": ALLOCATORS}
_loaded = False


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def parameters(cls: type) -> list[str]:
    """The parameters of a scorer or allocator class (its ``__init__`` keywords), in signature order."""
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


class SelectorKeys(BaseModel):
    model_config = STRICT
    n_sink: NonNegative = 0
    n_recent: NonNegative = 0
    recent_share: Fraction = 0.0


class MethodKeys(BaseModel):
    """The method-level keys of a method config (the parts are checked against their own classes)."""
    model_config = STRICT
    name: Annotated[str, Field(min_length=1)]
    label: Annotated[str, Field(min_length=1)] | None = None
    preset: str | None = None
    # how ratios become counts (harness.compress.BudgetRule): null = floor; every kvpress preset sets kvpress
    budget_rule: BudgetRule | None = None
    prefill_chunk: Count | None = None  # prefill this many tokens at a time, compressing after each chunk
    rerotate_keys: Flag = False  # kept keys rotated to positions 0 .. n - 1 after eviction
    scorer: Any = None
    allocator: Any = None
    selector: Any = None


def _unknown(where: str, key: str, allowed: list[str], hint: str = "") -> KvbenchError:
    near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    guess = f"; did you mean {near[0]}?" if near else hint
    shown = ", ".join(allowed) if allowed else "none"
    return KvbenchError(f"{where}.{key} is not a key of {where.rsplit('.', 1)[-1] if '.' in where else where}"
                        f"{guess} (keys: {shown})")


def _part_config(kind: str, node: Any, where: str | None = None) -> dict[str, Any] | None:
    """A part's config as a dict ``{name, ...}`` (a bare name is ``{name: <it>}``); None for no part. ``where``:
    the node's dotted key (``method.scorer.base`` for a wrapped scorer's base; default ``method.<kind>``)."""
    where = where or f"method.{kind}"
    if node is None:
        return None
    if isinstance(node, str):
        node = {"name": node}
    if not isinstance(node, dict):
        raise KvbenchError(f"{where} must be a {kind} name or a config node (name: ..., parameters); "
                           f"got {node!r}")
    name = node.get("name")
    registry = PART_KINDS[kind]
    if name is None and kind == "scorer":
        if len(node) > 1:
            raise KvbenchError(f"{where} has parameters but no name; allowed: {', '.join(sorted(registry))}")
        return None
    if not isinstance(name, str) or name not in registry:
        raise KvbenchError(f"{where}.name={name!r} is not known; allowed: {', '.join(sorted(registry))}")
    return dict(node)


def _scorer_params(cls: type) -> tuple[str, ...]:
    """The parameters of a scorer class that are scorer nodes themselves (a wrapper's ``base``)."""
    return cls.SCORER_PARAMS if isinstance(cls, type) and issubclass(cls, WrappedScorer) else ()


def _checked_part(kind: str, node: dict, where: str) -> dict:
    """One part node ``{name, ...}`` checked: its keys against its class's parameters, their values against the
    annotations; a wrapped scorer's base (``where.base``) checked the same way, recursively."""
    cls = PART_KINDS[kind][node["name"]]
    params = {k: v for k, v in node.items() if k != "name"}
    allowed = parameters(cls)
    swap = f" ({where}=<name> swaps the part, starting from its own defaults)"
    for key in params:
        if not allowed:
            raise KvbenchError(f"{where}.{key}: {kind} {node['name']!r} takes no parameters{swap}")
        if key not in allowed:
            raise _unknown(where, key, allowed, hint=swap)
    nested = {}
    for key in _scorer_params(cls):
        sub = _part_config("scorer", params.pop(key, None), f"{where}.{key}")
        if sub is None:
            raise KvbenchError(f"{where}.{key} must name the scorer that {node['name']} wraps; allowed: "
                               f"{', '.join(sorted(SCORERS))}")
        nested[key] = _checked_part("scorer", sub, f"{where}.{key}")
    # each value checked against the class's annotated signature before anything is built
    checked = check_params(where, cls, params)
    return {"name": node["name"], **{k: nested[k] if k in nested else checked[k] for k in node if k != "name"}}


def _build_part(kind: str, node: dict):
    """A part built from its checked node (a wrapped scorer's base first)."""
    cls = PART_KINDS[kind][node["name"]]
    params = {k: v for k, v in node.items() if k != "name"}
    for key in _scorer_params(cls):
        if key in params:
            params[key] = _build_part("scorer", params[key])
        else:  # the class's default, a scorer name or node
            params[key] = _build_part("scorer", _part_config("scorer", inspect.signature(cls).parameters[key].default))
    return cls(**params)


def _preset_values(node: Any, preset: str) -> dict | None:
    """What ``method.preset=<preset>`` sets for a scorer node: its class's ``PRESETS[preset]`` and, for a wrapped
    scorer, each base's own preset with the base's scorer values under ``scorer.<base key>`` (SnapKV's window)
    and its other values (selector, allocator, budget_rule) beside the wrapper's, which win where both set a key.
    None when neither the scorer nor any base has that preset."""
    from omegaconf import OmegaConf

    node = _part_config("scorer", node)
    if node is None:
        return None
    cls = SCORERS[node["name"]]
    own = copy.deepcopy(cls.PRESETS.get(preset))
    merged: dict = {}
    found = own is not None
    for key in _scorer_params(cls):
        sub = _preset_values(node.get(key, inspect.signature(cls).parameters[key].default), preset)
        if sub is None:
            continue
        found = True
        base_scorer = sub.pop("scorer", {})
        merged = OmegaConf.to_container(OmegaConf.merge(merged, sub, {"scorer": {key: base_scorer}}))
    if not found:
        return None
    return OmegaConf.to_container(OmegaConf.merge(merged, own or {}))


def _with_preset(cfg: Any) -> tuple[dict, dict]:
    """``(as configured, as run)``: the config resolved, and with its ``preset``'s values merged in before the
    interpolations resolve (pyramidkv's ``allocator.window: ${..scorer.window}`` follows a preset's window)."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    unresolved = OmegaConf.to_container(node, resolve=False)
    # dropped before resolving: an interpolation of a dropped key (lkv's allocator.checkpoint) goes too
    node = OmegaConf.create(_drop_stale(copy.deepcopy(unresolved), unresolved))
    configured = OmegaConf.to_container(node, resolve=True)
    preset = configured.get("preset")
    if not preset:
        return configured, configured
    scorer = _part_config("scorer", configured.get("scorer"))
    values = _preset_values(scorer, preset) if scorer else None  # a wrapper's and its base's presets
    if values is None:
        presets = _preset_names(scorer) if scorer else set()
        allowed = ", ".join(sorted(presets)) or "none for this method"
        raise KvbenchError(f"method.preset={preset!r} is not known for {configured.get('name')}; allowed: {allowed}")
    unresolved = OmegaConf.to_container(node, resolve=False)
    for kind in ("scorer", "allocator"):  # a part given by name alone becomes a node the preset can fill
        if isinstance(unresolved.get(kind), str):
            unresolved[kind] = {"name": unresolved[kind]}
    _name_bases(unresolved.get("scorer"))
    merged = OmegaConf.merge(OmegaConf.create(unresolved), OmegaConf.create(values))
    return configured, OmegaConf.to_container(merged, resolve=True)


def _preset_names(node: Any) -> set[str]:
    """The presets a scorer node has: its class's and, for a wrapper, its bases'."""
    node = _part_config("scorer", node)
    if node is None:
        return set()
    cls = SCORERS[node["name"]]
    names = set(cls.PRESETS)
    for key in _scorer_params(cls):
        names |= _preset_names(node.get(key, inspect.signature(cls).parameters[key].default))
    return names


def _name_bases(node: Any) -> None:
    """A wrapper's base given by name alone (or left to the class default) becomes a ``{name: ...}`` node in place,
    recursively, so a preset can set the base's values."""
    if not isinstance(node, dict) or node.get("name") not in SCORERS:
        return
    cls = SCORERS[node["name"]]
    for key in _scorer_params(cls):
        base = node.get(key, inspect.signature(cls).parameters[key].default)
        if isinstance(base, str):
            base = {"name": base}
        node[key] = base
        _name_bases(base)


def _checked(cfg: dict) -> dict:
    """Every key of a resolved method config checked (type, range, which part it belongs to): the config in
    its checked spellings (``use_vnorm: no`` -> false), parts as ``{name, ...}`` nodes."""
    for key in cfg:
        if key not in MethodKeys.model_fields:
            part = next((k for k, reg in PART_KINDS.items() for cls in reg.values() if key in parameters(cls)), None)
            hint = f"; did you mean method.{part}.{key}?" if part else ""
            if key in SelectorKeys.model_fields:
                hint = f"; did you mean method.selector.{key}?"
            raise _unknown("method", key, list(MethodKeys.model_fields), hint)
    try:
        keys = MethodKeys.model_validate(cfg)
    except ValidationError as err:
        raise to_error(err, cfg, prefix="method") from None
    selector = cfg.get("selector") or {}
    if not isinstance(selector, dict):
        raise KvbenchError(f"method.selector must be a config node (n_sink, n_recent, recent_share); got {selector!r}")
    for key in selector:
        if key not in SelectorKeys.model_fields:
            raise _unknown("method.selector", key, list(SelectorKeys.model_fields))
    try:
        selector = SelectorKeys.model_validate(selector).model_dump()
    except ValidationError as err:
        raise to_error(err, selector, prefix="method.selector") from None
    out = {**cfg, **{k: v for k, v in keys.model_dump().items() if k in cfg}, "selector": selector}
    for kind in PART_KINDS:
        node = _part_config(kind, cfg.get(kind))
        if node is not None:
            out[kind] = _checked_part(kind, node, f"method.{kind}")
        elif kind in cfg:
            out[kind] = None
    return out


def _file_parts(name: str) -> tuple[dict[str, str], dict[str, dict], str | None]:
    """A method config file's own part choices (its defaults list), the part values it sets itself, and its
    label; empty when ``name`` is no method file."""
    from omegaconf import OmegaConf

    path = conf.find("method", name) if isinstance(name, str) else None
    if path is None:
        return {}, {}, None
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    choices = {k: v for entry in raw.get("defaults") or [] if isinstance(entry, dict) for k, v in entry.items()}
    return choices, {kind: raw.get(kind) or {} for kind in PART_KINDS}, raw.get("label")


def _part_name(node: Any) -> str | None:
    return node if isinstance(node, str) else node.get("name") if isinstance(node, dict) else None


def _drop_stale(configured: dict, unresolved: dict) -> dict:
    """A part swapped on the command line (``method=lkv method.allocator=uniform``) starts from its own defaults:
    the values the method file set for the part it chose (lkv's ``min_budget``) are dropped where the new part
    does not take them, unless they were changed (a typed value for the wrong part is still an error)."""
    choices, own, file_label = _file_parts(configured.get("name"))
    swapped = [kind for kind in PART_KINDS if kind in choices and _part_name(configured.get(kind)) != choices[kind]]
    if swapped and configured.get("label") == file_label:
        # The file's label names the file's parts: rows of another composition are named by their parts
        # (method=snapkv method.scorer=tova -> tova; method=lkv method.scorer=snapkv -> snapkv+lkv).
        scorer, allocator = _part_name(configured.get("scorer")), _part_name(configured.get("allocator")) or "uniform"
        label = scorer or configured.get("name")
        suffix = scorer and (allocator != "uniform" or "allocator" in swapped)  # lkv -> LKV-T alone: lkv+uniform
        configured["label"] = f"{label}+{allocator}" if suffix else label
    for kind, values in own.items():
        node = configured.get(kind)
        if not isinstance(node, dict) or choices.get(kind) in (None, node.get("name")):
            continue
        allowed = parameters(PART_KINDS[kind][node["name"]]) if node.get("name") in PART_KINDS[kind] else []
        raw = unresolved.get(kind) or {}
        for key, value in values.items():
            if key in node and key not in allowed and raw.get(key) == value:
                del node[key]
                for other in PART_KINDS:  # a part that followed the dropped value keeps it (lkv's allocator)
                    peer = configured.get(other)
                    if isinstance(peer, dict) and peer.get(key) == f"${{..{kind}.{key}}}":
                        peer[key] = value
    return configured


def build_method(cfg, decoding: DecodingPlan = PREFILL_ONLY) -> Method:
    """A ``Method`` from a method config (a dict or an OmegaConf node; see the layout above), compressing when
    ``decoding`` says (the run's ``decoding:``; default: once after the prefill)."""
    load_all()
    from omegaconf import DictConfig

    if not isinstance(cfg, (dict, DictConfig)):
        raise KvbenchError("method= must be a config node (key: value)")
    try:
        configured, run_cfg = _with_preset(cfg)
    except KvbenchError:
        raise
    except Exception as err:  # an interpolation that cannot resolve, a value OmegaConf cannot hold
        raise KvbenchError(f"method: {str(err).splitlines()[0]}") from None
    recorded = _checked(configured)  # what the run dir records: the preset by name, not its values
    run_cfg = recorded if run_cfg is configured else _checked(run_cfg)
    scorer_cfg, allocator_cfg = run_cfg.get("scorer"), run_cfg.get("allocator") or {"name": "uniform"}
    scorer = _build_part("scorer", scorer_cfg) if scorer_cfg else None
    allocator = _build_part("allocator", allocator_cfg)
    label = run_cfg.get("label") or run_cfg["name"]
    own = (run_cfg["name"], scorer.registered_name, f"{scorer.registered_name}+{allocator_cfg['name']}") if scorer else ()
    if isinstance(scorer, WrappedScorer) and label in own:  # no label of the user's (_drop_stale's is by parts)
        # a wrapper's rows name what it wraps (criticalkv(snapkv)), so a swapped base is traced in the rows
        label = scorer.label
        usual = scorer.OWN_ALLOCATORS or ("uniform",)  # ChunkKV's own is chunk: uniform is a swap there
        if allocator_cfg["name"] not in usual:
            label = f"{label}+{allocator_cfg['name']}"
    elif not run_cfg.get("label") and allocator_cfg["name"] != "uniform" and scorer is not None:
        label = f"{run_cfg['name']}+{allocator_cfg['name']}"
    try:
        return Method(
            name=label,
            scorer=scorer,
            allocator=allocator,
            selector=Selector(**run_cfg["selector"]),
            budget_rule=run_cfg.get("budget_rule") or "floor",
            config=recorded,
            prefill_chunk=run_cfg.get("prefill_chunk"),
            rerotate_keys=bool(run_cfg.get("rerotate_keys", False)),
            decoding=decoding,
        )
    except ValueError as err:  # an option the composition cannot honour (Method.__post_init__)
        raise KvbenchError(str(err)) from None


def config_names() -> list[str]:
    """The method configs (``method=<name>``): ``conf/method/`` and the user's config dirs (``conf.options``)."""
    return conf.options("method")


def config(name: str, *overrides: str, **values: Any) -> dict:
    """A method's config as kvbench composes it (Hydra: ``conf/method/<name>.yaml`` with its parts' configs).

    ``overrides`` are command-line overrides relative to ``method.`` (``"allocator=adakv"``,
    ``"scorer.window=16"``). Keyword ``values`` are the short spelling for scripts: a method-level key
    (``preset="kvpress"``), a part by name (``allocator="adakv"``), a selector key (``n_recent=8``), or a
    parameter of exactly one of the method's parts (``window=16`` is the scorer's for snapkv); a parameter both
    parts take is the scorer's when the allocator's follows it (lkv's ``checkpoint``), else an error::

        methods.config("snapkv", "allocator=adakv", "scorer.window=16")
        methods.config("snapkv", allocator="adakv", window=16, alpha=0.3)
    """
    from omegaconf import OmegaConf

    from harness.overrides import Composer

    if name not in config_names():
        raise KvbenchError(f"method={name!r} is not known; allowed: {', '.join(config_names())}")
    load_all()
    given = [f"method.{o}" for o in overrides]
    given += [f"method.{kind}={values.pop(kind)}" for kind in list(PART_KINDS) if isinstance(values.get(kind), str)]
    with Composer(conf.CONF_DIR, "config") as composer:
        cfg = OmegaConf.to_container(composer.compose([f"method={name}", *given]).method, resolve=False)
    for key, value in values.items():
        if key in MethodKeys.model_fields:
            cfg[key] = value
        elif key in SelectorKeys.model_fields:
            cfg.setdefault("selector", {})[key] = value
        else:
            owners = [kind for kind in PART_KINDS if isinstance(cfg.get(kind), dict)
                      and key in parameters(PART_KINDS[kind][cfg[kind]["name"]])]
            follows = len(owners) == 2 and cfg["allocator"].get(key) == f"${{..scorer.{key}}}"
            if not owners or (len(owners) == 2 and not follows):
                parts = ", ".join(f"{kind} {cfg[kind]['name']!r}" for kind in PART_KINDS if isinstance(cfg.get(kind), dict))
                why = "both parts take it: say scorer.<key>= or allocator.<key>=" if owners else f"not a key of {parts}"
                raise KvbenchError(f"method {name}: {key}={value!r}: {why}")
            cfg[owners[0]][key] = value
    return cfg


def load(name: str, *overrides: str, **values: Any) -> Method:
    """A ready ``Method`` by config name, for scripts and notebooks: ``methods.load("snapkv", preset="kvpress")``."""
    return build_method(config(name, *overrides, **values))
