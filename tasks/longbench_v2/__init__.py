"""LongBench v2 (Bai et al., 2024, arXiv:2412.15204): 503 four-choice questions on long documents.

Registers ``longbench_v2/<domain>`` for the six official domains (suite ``longbench_v2``: all 503 questions), so
the summary scores each domain and the suite's report section gives result.py's overall / easy / hard / short /
medium / long accuracy. Everything follows THUDM/LongBench's v2 code (the repository root): prompts/*.txt,
pred.py's filling, truncation and answer extraction, result.py's table. See docs/longbench_v2.md.

Use from other code::

    from tasks.longbench_v2 import make_task
    task = make_task("longbench_v2/code_repo", data_dir="/path/to/dir")  # <dir>/data.json
    samples = task.samples(encoder, context_length, n_samples, seed)
    task.score(prediction, sample)                                       # 1.0 if pred.py's extract_answer matches
"""
from __future__ import annotations

from tasks import register_report_hook, register_suite
from tasks.longbench_v2.aggregate import report_section
from tasks.longbench_v2.config import DOMAINS
from tasks.longbench_v2.metrics import aggregate, extract_answer
from tasks.longbench_v2.task import SUITE, LongBenchV2Task, task_class


make_task = register_suite(SUITE, DOMAINS, task_class)
register_report_hook(report_section)

__all__ = ["make_task", "LongBenchV2Task", "task_class", "DOMAINS", "extract_answer", "aggregate", "report_section"]
