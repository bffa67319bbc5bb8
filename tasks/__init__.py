"""Task registry, lm-evaluation-harness style: ``get_task("ruler/niah_single_1", data_dir=...)``.

Suites register a factory per task name; ``expand("ruler")`` lists a suite's task names. Every package or
module of this package (``tasks/<name>/`` or ``tasks/<name>.py``, names not starting with ``_``) is imported on
first use, as ``methods.load_all`` does for methods: adding a task = adding its module with its ``register`` calls.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from harness.errors import KvbenchError
from tasks.base import PromptEncoder, Sample, Task

_REGISTRY: dict[str, Callable[..., Task]] = {}
_REPORT_HOOKS: list[Callable] = []
_SUITES: dict[str, list[str]] = {}
_NOT_TASKS = {"base"}  # modules of this package that register nothing (the protocol)
_loaded = False


def register(name: str, suite: str | None = None):
    def deco(factory):
        _REGISTRY[name] = factory
        if suite:
            _SUITES.setdefault(suite, []).append(name)
        return factory

    return deco


def register_suite(suite: str, names, task_class: Callable[[str], type]) -> Callable[..., Any]:
    """Register ``<suite>/<name>`` for each of ``names``, each built by ``task_class(name)(**options)``; returns
    the suite's ``make_task(name, **options)`` (``'<suite>/<name>'`` or ``'<name>'``)."""
    def factory_of(short: str):
        def factory(**kwargs):
            return task_class(short)(**kwargs)

        factory.__name__ = f"{suite}_{short}"
        return factory

    for short in names:
        register(f"{suite}/{short}", suite=suite)(factory_of(short))

    def make_task(name: str, **kwargs):
        prefix, _, short = name.rpartition("/")
        if prefix not in ("", suite):
            raise KeyError(name)
        return task_class(short)(**kwargs)

    make_task.__doc__ = f"'{suite}/<name>' or '<name>': the task built with its options."
    return make_task


def register_report_hook(fn: Callable) -> Callable:
    """A suite's report section: ``fn(rows_dataframe) -> markdown or None`` (e.g. LongBench's category table)."""
    _REPORT_HOOKS.append(fn)
    return fn


def report_hooks() -> list[Callable]:
    load_all()
    return list(_REPORT_HOOKS)


def task_modules() -> list[str]:
    """The names of the modules that register tasks: every package or module of ``tasks`` but ``base``
    and those starting with ``_``."""
    return [f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__)
            if not info.name.startswith("_") and info.name not in _NOT_TASKS]


def load_all() -> None:
    """Import every task module (once), so that their ``register`` calls have run."""
    global _loaded
    if _loaded:
        return
    for mod in task_modules():
        importlib.import_module(mod)
    _loaded = True


def available() -> list[str]:
    load_all()
    return sorted(_REGISTRY)


def suites() -> dict[str, list[str]]:
    load_all()
    return {k: list(v) for k, v in _SUITES.items()}


def expand(name: str) -> list[str]:
    """A task name, or a suite name, to the list of task names."""
    load_all()
    if name in _SUITES:
        return list(_SUITES[name])
    if name in _REGISTRY:
        return [name]
    raise KeyError(name)


def get_task(name: str, suite: str | None = None, **kwargs) -> Task:
    """The task ``name`` built with its config's keys (``data_dir``, ``depth``, ...); KeyError if unknown.

    Run alone, a task that reads no data files (``Task.reads_data`` false) refuses a ``data_dir``. As a member
    of ``suite`` (``task=ruler``: one data_dir for all members) it is built without it instead."""
    load_all()
    if name not in _REGISTRY:
        raise KeyError(name)
    task = _REGISTRY[name](**kwargs)
    if task.data_dir is not None and not task.reads_data:
        if suite is None:
            raise KvbenchError(f"{name} reads no data files, so task.data_dir={str(task.data_dir)!r} would be "
                               "ignored; drop task.data_dir (or pick the task that reads them)")
        task.data_dir = None
    return task


__all__ = ["PromptEncoder", "Sample", "Task", "register", "register_report_hook", "report_hooks", "load_all", "task_modules",
           "available", "suites", "expand", "get_task"]
