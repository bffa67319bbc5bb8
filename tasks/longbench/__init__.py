"""LongBench (Bai et al., 2024) v1: 21 datasets (suite "longbench") and LongBench-E (13, suite "longbench_e").

Registers ``longbench/<dataset>`` and ``longbench_e/<dataset>``. Everything follows THUDM/LongBench (v1 code
under ``LongBench/``): prompts and generation lengths from config/, middle truncation and the chat-template
exceptions from pred.py, metrics and aggregation from metrics.py / eval.py. See tasks/longbench/config.py.

Use from other code::

    from tasks.longbench import make_task
    task = make_task("longbench/qasper", data_dir="/path/to/LongBench/data")  # <data_dir>/qasper.jsonl
    samples = task.samples(encoder, context_length, n_samples, seed)
    task.score(prediction, sample)                       # = tasks.longbench.metrics.score(...)
    type(task).skip_chat_template                         # True for trec, triviaqa, samsum, lsht, lcc, repobench-p
"""
from __future__ import annotations

from tasks import register, register_report_hook
from tasks.longbench.aggregate import category_table, dataset_scores, e_bucket_table, e_category_buckets, report_section
from tasks.longbench.config import CATEGORIES, DATASETS, E_DATASETS, category_of
from tasks.longbench.metrics import score
from tasks.longbench.prompt import build_prompt, middle_halves, truncate_middle
from tasks.longbench.task import LongBenchTask, task_class


def make_task(name: str, **kwargs) -> LongBenchTask:
    """'longbench/qasper', 'longbench_e/qasper' or 'qasper' (plain LongBench)."""
    suite, _, dataset = name.rpartition("/")
    if suite not in ("", "longbench", "longbench_e"):
        raise KeyError(name)
    return task_class(dataset, e=suite == "longbench_e")(**kwargs)


def _factory(dataset: str, e: bool):
    cls = task_class(dataset, e)

    def factory(**kwargs) -> LongBenchTask:
        return cls(**kwargs)

    factory.__name__ = f"{'longbench_e' if e else 'longbench'}_{dataset}"
    return factory


for _d in DATASETS:
    register(f"longbench/{_d}", suite="longbench")(_factory(_d, False))
for _d in E_DATASETS:
    register(f"longbench_e/{_d}", suite="longbench_e")(_factory(_d, True))

register_report_hook(report_section)

__all__ = ["make_task", "LongBenchTask", "task_class", "DATASETS", "E_DATASETS", "CATEGORIES", "category_of", "score",
           "build_prompt", "middle_halves", "truncate_middle", "dataset_scores", "category_table", "e_bucket_table",
           "e_category_buckets", "report_section"]
