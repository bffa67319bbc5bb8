"""Command-line overrides checked before Hydra runs anything: every job of a run or sweep is composed first, and
Hydra's own errors (a typo in a key, a malformed override, an unknown choice) become one ``KvbenchError`` line
that names the key and the closest valid one, instead of Hydra's 5-7 lines and exit status 1.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from harness.errors import KvbenchError

# Hydra flags that take a value as the next argument; every other "-x" argument stands alone.
VALUE_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package",
               "--experimental-rerun", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}
# Flags after which Hydra composes nothing we run (help, printing the config) or composes from another config
# dir: the preflight leaves those commands to Hydra.
# (``--config-dir`` is not one: it adds a user config dir to the search path, see harness.cli.config_dirs.)
PASS_THROUGH = {"-h", "--help", "-hh", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info", "-sc",
                "--shell-completion", "-cp", "--config-path", "-cn", "--config-name", "--experimental-rerun"}
MULTIRUN_FLAGS = {"-m", "--multirun"}
MAX_JOBS = 10_000


# ``method.scorer=<name>`` / ``method.allocator=<name>`` pick a part by name, as before method configs were
# nested: they mean Hydra's group override ``method/scorer=<name>`` (the part's config with its own defaults).
PART_GROUPS = ("method.scorer", "method.allocator")
_PART_ALIAS = re.compile(rf"^({'|'.join(re.escape(k) for k in PART_GROUPS)})=(?![{{\[])(.*)$")


# ``method.scorer.base=<name>`` (a wrapped scorer's base, ``WrappedScorer.SCORER_PARAMS``: ``base``, and ``second``
# for ``composed``; ``.base.base`` one level deeper) picks
# the base's part config the same way: Hydra's ``method/scorer@method.scorer.base=<name>``, so a base parameter can
# follow it (``method.scorer.base=tova method.scorer.base.<key>=...``) and the old base's keys are gone.
_BASE_ALIAS = re.compile(r"^(method\.scorer(?:\.(?:base|second))+)=(?![{\[])(?!null$)(.+)$")  # null: the checker's


def aliases(overrides: list[str]) -> list[str]:
    """Overrides with the documented short spellings rewritten into what Hydra composes."""
    out = []
    for override in overrides:
        m = _PART_ALIAS.match(override)
        base = _BASE_ALIAS.match(override)
        if base:
            out.append(f"method/scorer@{base.group(1)}={base.group(2)}")
        else:
            out.append(f"{m.group(1).replace('.', '/')}={m.group(2)}" if m and m.group(2) else override)
    return out


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(overrides, flags)``: the key=value arguments, and Hydra's flags with their values."""
    overrides, flags = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("-"):  # overrides start with a key, "+" or "~"; never with "-"
            flags.append(arg)
            if arg in VALUE_FLAGS:
                flags.append(next(args, ""))
        else:
            overrides.append(arg)
    return overrides, flags


def is_multirun(argv: list[str]) -> bool:
    overrides, flags = split_argv(argv)
    return bool(MULTIRUN_FLAGS & set(flags)) or any(o.replace(" ", "") == "hydra.mode=MULTIRUN" for o in overrides)


def expand_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job: one for a run; for a sweep, Hydra's own expansion of comma lists and
    sweep functions (the order the basic sweeper runs them)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for override in overrides:
        try:
            parsed.extend(parser.parse_overrides([override]))
        except HydraException as err:
            lines = [ln for ln in str(err).strip().splitlines() if ln.strip() and not ln.startswith(("See ", "Error parsing"))]
            reason = lines[0].strip() if lines else type(err).__name__
            raise KvbenchError(f"cannot parse the override {override!r} ({reason}); the form is key=value, "
                               "a sweep key=a,b, a list key=[a,b]") from None
    if not multirun:
        return [overrides]
    try:
        batches = BasicSweeper.split_arguments(parsed, None)
    except HydraException as err:
        raise KvbenchError(_first_line(err)) from None
    jobs = [list(job) for batch in batches for job in batch]
    if len(jobs) > MAX_JOBS:
        raise KvbenchError(f"the sweep has {len(jobs)} jobs; at most {MAX_JOBS} are allowed in one command")
    return jobs


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if err.__cause__ is not None and str(err.__cause__).strip():
        text = f"{text.splitlines()[0]} ({str(err.__cause__).strip().splitlines()[0]})" if text else str(err.__cause__)
    return text.splitlines()[0] if text else type(err).__name__


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config node (``method.window``, ``model.path``, ...)."""
    from omegaconf import DictConfig

    out = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}{key}"
            out.append(full)
            try:
                child = node._get_node(key)
            except Exception:  # an interpolation that cannot resolve yet: its key still counts
                continue
            out.extend(dotted_keys(child, full + "."))
    return out


def _unknown_key_error(key: str, base) -> KvbenchError:
    """``key`` is not in the composed config: name the closest valid key of the same node (or a key of the same
    name one level down: ``method.window`` -> ``method.scorer.window``)."""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    leaf = key.rsplit(".", 1)[-1]
    keys = [k for k in dotted_keys(base) if not k.startswith("hydra")]
    siblings = [k for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    below = [k for k in keys if k.startswith(f"{parent}.") and k.count(".") == key.count(".") + 1
             and k.endswith(f".{leaf}")] if parent else []
    near = below[:1] or difflib.get_close_matches(key, siblings, n=1, cutoff=0.5) or difflib.get_close_matches(key, keys, n=1)
    where = f"{parent} ({_choice(base, parent)})" if parent else "the config"
    hint = f"; did you mean {near[0]}?" if near else ""
    shown = ", ".join(k.rsplit(".", 1)[-1] for k in siblings[:40])
    if parent.startswith("method"):  # a method's keys and its parts' parameters are fixed by their classes
        return KvbenchError(f"{key} is not a key of {where}{hint} (keys: {shown})")
    return KvbenchError(f"{key} is not a key of {where}{hint} (keys: {shown}; add a new key with +{key}=...)")


def _choice(base, parent: str) -> str:
    node = base
    for part in parent.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    name = node.get("name") if hasattr(node, "get") else None
    return f"{parent}={name}" if name else parent


class Composer:
    """Hydra's composition of jobs from one config dir, each a config or a one-line ``KvbenchError`` for whatever
    Hydra refuses (``with Composer(dir, "config") as c: c.compose([...])``)."""

    def __init__(self, config_dir: str | Path, config_name: str):
        self.config_dir, self.config_name = str(config_dir), config_name

    def __enter__(self) -> "Composer":
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        self._context = initialize_config_dir(config_dir=self.config_dir, version_base=None)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from hydra.core.global_hydra import GlobalHydra

        self._context.__exit__(*exc)
        GlobalHydra.instance().clear()

    def _compose(self, overrides: list[str]):
        import conf
        from hydra import compose as hydra_compose

        # the user's config dirs (``--config-dir``, ``kvbench.add_config_dir``) after the shipped ones
        return hydra_compose(config_name=self.config_name, overrides=[*overrides, *conf.searchpath_override()])

    def compose(self, overrides: list[str]):
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        import yaml

        from harness.paths import yaml_position

        overrides = aliases(overrides)
        try:
            return self._compose(overrides)
        except yaml.YAMLError as err:  # a config file (a user's --config-dir) that is not YAML
            mark = getattr(err, "problem_mark", None)
            where = repr(mark.name) if mark is not None else "a config file"
            raise KvbenchError(f"{where} is not valid YAML{yaml_position(err)}; fix that config") from None
        except OSError as err:
            raise KvbenchError(f"cannot read a config file: {err.filename!r}: {err.strerror or err}") from None
        except (HydraException, OmegaConfBaseException, ValueError, TypeError) as err:  # Hydra raises all four
            text = str(err)
            wrapped = re.search(r"Could not override 'method/scorer@(method\.scorer(?:\.(?:base|second))*)"
                                r"\.(base|second)'", text)
            if wrapped:  # method.scorer.base=<name> where the scorer is no wrapper (harness.compress.WrappedScorer)
                raise KvbenchError(f"{wrapped.group(1)}.{wrapped.group(2)}: the scorer {wrapped.group(1)} has no "
                                   f"{wrapped.group(2)} scorer (only a wrapping scorer, e.g. criticalkv, chunkkv, "
                                   "composed, has a base)") from None
            bad = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
            if bad:
                key = bad.group(1)
                rest = [o for o in overrides if not re.match(rf"[+~]*{re.escape(key)}=", o)]
                try:
                    base = self._compose(rest)
                except (HydraException, OmegaConfBaseException):
                    base = None
                if base is not None:
                    raise _unknown_key_error(key, base) from None
            raise KvbenchError(_first_line(err)) from None
