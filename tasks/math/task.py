"""The math tasks: official records -> the reasoning prompt (used whole) -> samples; math-verify scores them.

A problem is never cut: a truncated problem is another problem. ``context_length`` is the bound the prompt must
fit (the runner's contract); a prompt longer than it is refused with one line naming the longest problem and the
length that fits them all. The generation comes on top (``max_new_tokens``, 32768 by default: config.py).
"""
from __future__ import annotations

from typing import Any

from harness.errors import KvbenchError
from tasks.base import PromptEncoder, Sample, Task
from tasks.longbench.task import select_indices
from tasks.math import metrics
from tasks.math.config import DATASETS, MAX_NEW_TOKENS, SUITE
from tasks.math.data import load_problems, locate
from tasks.math.prompt import opens_think, prompt_parts

OPTIONS = ("data_dir",)


class MathTask(Task):
    """One dataset of the suite (MATH-500, AIME 2024, AIME 2025). Subclassed per dataset (``task_class``)."""

    short_name: str = ""
    reads_data = True
    finite = True  # n_samples=None: every problem (the suite's default: 500 / 30 / 30)

    def __init__(self, data_dir: str | None = None, **params: Any):
        if params:
            raise KvbenchError(f"{self.name}: unknown task option(s) {', '.join(sorted(params))}; allowed: "
                               f"{', '.join(OPTIONS)}")
        super().__init__(data_dir=data_dir)
        if data_dir is not None:
            locate(DATASETS[self.short_name], data_dir, self.name)  # refused when the run is checked, before its dir
        self._problems: list[dict] | None = None

    def problems(self) -> list[dict]:
        if self._problems is None:
            self._problems = load_problems(self.short_name, self.data_dir, self.name)
        return self._problems

    def build_sample(self, encoder: PromptEncoder, problem: dict) -> Sample:
        context, question, answer_prefix = prompt_parts(problem["problem"], encoder.chat)
        meta = {**problem["meta"], "answer": problem["answer"],
                "prompt": "r1_boxed" if encoder.chat else "r1_boxed_raw",  # with / without the chat template
                "prompt_tokens": encoder.count(context, question, answer_prefix),
                "prompt_opens_think": opens_think(encoder.text(context, question, answer_prefix))}
        return Sample(sample_id=problem["id"], context=context, question=question, answers=[problem["answer"]],
                      answer_prefix=answer_prefix, max_new_tokens=MAX_NEW_TOKENS, meta=meta)

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int | None,
                seed: int) -> list[Sample]:
        problems = self.problems()
        count = None if n_samples is None else int(n_samples)
        picked = select_indices(len(problems), count, int(seed), self.name)
        samples = [self.build_sample(encoder, problems[i]) for i in picked]
        longest = max(samples, key=lambda s: s.meta["prompt_tokens"])
        if longest.meta["prompt_tokens"] > context_length:
            raise KvbenchError(f"{self.name}: problem {longest.sample_id!r} takes {longest.meta['prompt_tokens']} "
                               f"prompt tokens, more than context_length={context_length}; math problems are never "
                               f"truncated, so use context_length >= {longest.meta['prompt_tokens']}")
        return samples

    def score(self, prediction: str, sample: Sample) -> float:
        return float(metrics.judge(prediction, sample.answers[0], bool(sample.meta.get("prompt_opens_think"))))

    def prediction_meta(self, prediction: str, sample: Sample) -> dict[str, Any]:
        """What a row's meta should add for this continuation: the extracted answer and how the thinking was found
        (``Task.prediction_meta``: the runner adds it to the row's meta)."""
        return metrics.extraction(prediction, bool(sample.meta.get("prompt_opens_think")))


_CLASSES: dict[str, type[MathTask]] = {}


def task_class(short_name: str) -> type[MathTask]:
    """The task class of a dataset ('aime24', 'aime25', 'math500'), with ``name`` and ``info`` set."""
    if short_name not in DATASETS:
        raise KeyError(f"{SUITE}/{short_name} is not a {SUITE} task; allowed: {', '.join(DATASETS)}")
    if short_name not in _CLASSES:
        attrs = {"short_name": short_name, "name": f"{SUITE}/{short_name}",
                 "info": {"suite": SUITE, "dataset": DATASETS[short_name].title, "metric": "math_verify_accuracy"}}
        _CLASSES[short_name] = type(f"Math_{short_name}", (MathTask,), attrs)
    return _CLASSES[short_name]
