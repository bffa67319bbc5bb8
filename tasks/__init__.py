"""Task registry, lm-evaluation-harness style: ``get_task("ruler/niah_single_1", data_dir=...)``.

Suites register a factory per task name; ``expand("ruler")`` lists a suite's task names.
"""
from __future__ import annotations

import importlib
from typing import Callable

from tasks.base import PromptEncoder, Sample, Task

_REGISTRY: dict[str, Callable[..., Task]] = {}
_REPORT_HOOKS: list[Callable] = []
_SUITES: dict[str, list[str]] = {}
_SUITE_MODULES = ("tasks.ruler", "tasks.longbench")


def register(name: str, suite: str | None = None):
    def deco(factory):
        _REGISTRY[name] = factory
        if suite:
            _SUITES.setdefault(suite, []).append(name)
        return factory

    return deco


def register_report_hook(fn: Callable) -> Callable:
    """A suite's report section: ``fn(rows_dataframe) -> markdown or None`` (e.g. LongBench's category table)."""
    _REPORT_HOOKS.append(fn)
    return fn


def report_hooks() -> list[Callable]:
    _load_all()
    return list(_REPORT_HOOKS)


def _load_all() -> None:
    for mod in _SUITE_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # a suite not written yet must not break the others
            if err.name != mod:
                raise


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def suites() -> dict[str, list[str]]:
    _load_all()
    return {k: list(v) for k, v in _SUITES.items()}


def expand(name: str) -> list[str]:
    """A task name, or a suite name, to the list of task names."""
    _load_all()
    if name in _SUITES:
        return list(_SUITES[name])
    if name in _REGISTRY:
        return [name]
    raise KeyError(name)


def get_task(name: str, **kwargs) -> Task:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name](**kwargs)


__all__ = ["PromptEncoder", "Sample", "Task", "register", "register_report_hook", "report_hooks", "available", "suites", "expand", "get_task"]
