"""RULER (Hsieh et al., 2024): 13 synthetic long-context tasks generated offline at any length.

Registers ``ruler/<name>`` for niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery,
vt, cwe, fwe, qa_1, qa_2 (suite "ruler"). Generators follow NVIDIA/RULER scripts/data/synthetic/*.py;
see tasks/ruler/common.py for seeding and length fitting (``length_rule``: ``ruler``, official RULER's, by
default; ``kvbench``), docs/ruler.md for every difference from RULER's generator, tasks/ruler/data/README.md for
the data files.

Use from other code::

    from tasks.ruler import make_task
    task = make_task("niah_single_1", depth=None, data_dir=None, length_rule="ruler")
    samples = task.samples(encoder, context_length, n_samples, seed)   # or task.sample(encoder, L, seed, i)
    task.score(prediction, sample)                                     # in [0, 1]
"""
from __future__ import annotations

from tasks import register
from tasks.ruler.common import RulerTask
from tasks.ruler.metrics import postprocess_pred, string_match_all, string_match_part
from tasks.ruler.niah import NIAH_TASKS, NiahTask
from tasks.ruler.templates import TASK_NAMES
from tasks.ruler.variable_tracking import VariableTrackingTask


def make_task(name: str, **kwargs) -> RulerTask:
    """A RULER task by short name ('niah_single_1') or full name ('ruler/niah_single_1')."""
    name = name.removeprefix("ruler/")
    if name in NIAH_TASKS:
        return NiahTask(name, **kwargs)
    if name == "vt":
        return VariableTrackingTask(**kwargs)
    if name == "cwe":
        from tasks.ruler.words import CommonWordsTask

        return CommonWordsTask(**kwargs)
    if name == "fwe":
        from tasks.ruler.words import FreqWordsTask

        return FreqWordsTask(**kwargs)
    if name in ("qa_1", "qa_2"):
        from tasks.ruler.qa import QaTask

        return QaTask(name, **kwargs)
    raise KeyError(name)


def _factory(short: str):
    def factory(**kwargs) -> RulerTask:
        return make_task(short, **kwargs)

    factory.__name__ = f"ruler_{short}"
    return factory


for _name in TASK_NAMES:
    register(f"ruler/{_name}", suite="ruler")(_factory(_name))

__all__ = ["make_task", "RulerTask", "NiahTask", "VariableTrackingTask", "TASK_NAMES", "postprocess_pred",
           "string_match_all", "string_match_part"]
