"""Reasoning benchmarks from their official files: MATH-500 (Lightman et al., 2023; 500 MATH test problems), AIME
2024 and AIME 2025 (30 problems each), as reasoning models are evaluated on them (DeepSeek-R1, Qwen, lighteval).

Registers ``math/aime24``, ``math/aime25`` and ``math/math500`` (suite ``math``: all three). The files are read from
``task.data_dir`` (nothing is downloaded: tasks/math/data.py says which copies are read); the prompt is the problem
and the R1 directive ("Please reason step by step, and put your final answer within \\boxed{}."), the user turn of
the chat template with ``model.chat=true``; the answer is extracted after the ``<think>`` block and checked with
math-verify (1 right, 0 wrong). See docs/math.md.

Use from other code::

    from tasks.math import make_task
    task = make_task("math/math500", data_dir="/path/to/dir")   # <dir>/test.jsonl (or <dir>/MATH-500/test.jsonl)
    samples = task.samples(encoder, context_length, n_samples, seed)
    task.score(prediction, sample)                              # 1.0 if math-verify finds the answer equivalent
"""
from __future__ import annotations

from tasks import register_suite
from tasks.math.config import DATASETS, SUITE
from tasks.math.metrics import answer_part, extraction, judge
from tasks.math.task import MathTask, task_class


make_task = register_suite(SUITE, DATASETS, task_class)

__all__ = ["make_task", "MathTask", "task_class", "DATASETS", "answer_part", "judge", "extraction"]
