"""The task registry discovers its task modules (``tasks.load_all``) and every registered name builds its task."""
from __future__ import annotations

import sys
import textwrap

import pytest

import tasks
from tasks.base import Task

_PROBE = '''
from tasks import register
from tasks.base import Sample, Task


class EchoTask(Task):
    name = "{suite}/echo"
    info = {{"suite": "{suite}", "category": "probe"}}

    def samples(self, encoder, context_length, n_samples, seed):
        return [Sample(sample_id=str(i), context="c", question="q", answers=["a"]) for i in range(n_samples)]

    def score(self, prediction, sample):
        return float(prediction == "a")


register("{suite}/echo", suite="{suite}")(EchoTask)
'''


@pytest.fixture
def scratch_registry(monkeypatch, tmp_path):
    """``tasks`` with a second search path (``tmp_path``) and registry copies, so nothing leaks into other tests."""
    tasks.load_all()  # the real modules first: their registrations are in the copies
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path)])
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    monkeypatch.setattr(tasks, "_SUITES", {k: list(v) for k, v in tasks._SUITES.items()})
    monkeypatch.setattr(tasks, "_loaded", False)
    before = set(sys.modules)
    yield tmp_path
    for mod in set(sys.modules) - before:
        if mod.startswith("tasks."):
            del sys.modules[mod]


def test_a_dropped_in_module_and_package_are_discovered(scratch_registry):
    root = scratch_registry
    (root / "probe_module.py").write_text(textwrap.dedent(_PROBE.format(suite="probe_module")))
    (root / "probe_package").mkdir()
    (root / "probe_package" / "__init__.py").write_text(textwrap.dedent(_PROBE.format(suite="probe_package")))
    (root / "_private_probe.py").write_text("raise RuntimeError('a module starting with _ is never imported')\n")
    assert "tasks.probe_module" in tasks.task_modules() and "tasks.probe_package" in tasks.task_modules()
    assert "tasks._private_probe" not in tasks.task_modules() and "tasks.base" not in tasks.task_modules()

    assert tasks.expand("probe_module") == ["probe_module/echo"]
    assert tasks.suites()["probe_package"] == ["probe_package/echo"]
    task = tasks.get_task("probe_package/echo")
    assert task.name == "probe_package/echo" and task.info["category"] == "probe"
    (sample,) = task.samples(None, 100, 1, 0)
    assert task.score("a", sample) == 1.0 and task.score("b", sample) == 0.0
    # the shipped suites are still there next to the new ones
    assert {"ruler", "longbench", "longbench_e", "ruler_kvpress"} <= set(tasks.suites())


def test_a_broken_task_module_is_not_hidden(scratch_registry):
    (scratch_registry / "probe_broken.py").write_text("import a_module_that_does_not_exist_kvbench\n")
    with pytest.raises(ModuleNotFoundError, match="a_module_that_does_not_exist_kvbench"):
        tasks.available()


# The shipped suites and their task counts, one line per suite (a new suite adds its own line; several suites may
# come from one module: longbench registers longbench and longbench_e).
SHIPPED_SUITES = {"ruler": 13, "ruler_kvpress": 13, "longbench": 21, "longbench_e": 13, "longbench_v2": 6}
SHIPPED_SUITES["niah"] = 1  # a suite of one task named as the suite (task=niah)
SHIPPED_MODULES = ["tasks.kvpress_ruler", "tasks.longbench", "tasks.longbench_v2", "tasks.niah", "tasks.ruler"]
SHIPPED_SUITES["infinitebench"] = 12
SHIPPED_MODULES += ["tasks.infinitebench"]
SHIPPED_SUITES["math"] = 3
SHIPPED_MODULES += ["tasks.math"]
SHIPPED_SUITES["longgen"] = 1
SHIPPED_MODULES += ["tasks.longgen"]


def test_the_shipped_task_modules():
    assert set(SHIPPED_MODULES) <= set(tasks.task_modules())


def test_every_registered_name_resolves():
    names = tasks.available()
    suites = tasks.suites()
    for suite, count in SHIPPED_SUITES.items():
        assert len(suites[suite]) == count, suite
    for name in names:
        task = tasks.get_task(name)
        assert isinstance(task, Task)
        assert task.name == name
        assert task.info["suite"] == name.split("/")[0]
        assert tasks.expand(name) == [name]
    members = [n for suite in tasks.suites().values() for n in suite]
    assert sorted(members) == names  # every task is in exactly one suite
    for suite, listed in tasks.suites().items():
        assert tasks.expand(suite) == listed
        assert listed == [suite] or all(n.startswith(f"{suite}/") for n in listed)  # one task may be the suite
    with pytest.raises(KeyError):
        tasks.get_task("ruler/no_such_task")
