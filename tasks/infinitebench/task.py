"""The InfiniteBench task on the official records: record -> official prompt -> official truncation -> Sample."""
from __future__ import annotations

from typing import Any

from harness.errors import KvbenchError
from tasks.base import PromptEncoder, Sample, Task
from tasks.infinitebench import metrics
from tasks.infinitebench.config import (CATEGORY, DEFAULT_PROMPT_FAMILY, LANGUAGE, MAX_NEW_TOKENS, METRIC, PAPER_NAME,
                                        PROMPT_FAMILIES, SYNTHETIC, TASKS)
from tasks.infinitebench.data import data_file, load_records
from tasks.infinitebench.prompt import fixed_tokens, prompt_parts, split_truncated, truncate
from tasks.longbench.task import select_indices, template_overhead

MAX_FIT_TRIES = 8
SUITE = "infinitebench"


def check_family(name: str, task: str, family: Any) -> str:
    """``prompt_family`` checked: one of ``PROMPT_FAMILIES``, with a prompt for ``task``."""
    if family not in PROMPT_FAMILIES:
        raise KvbenchError(f"{name}: prompt_family={family!r} is not known; allowed: yarn_mistral (the default: the "
                           "official template of every open model InfiniteBench ran: yarn-mistral, yi-6b-200k, "
                           "yi-34b-200k, chatglm3), gpt4, claude2")
    if family == "gpt4" and task == "math_calc":
        raise KvbenchError(f"{name}: prompt_family=gpt4 has no math_calc prompt kvbench can give (the official one is "
                           "a system prompt and a worked chat turn, eval_utils.create_msgs, scored without the first "
                           "number); use prompt_family=yarn_mistral or claude2 (in the suite: "
                           "task.exclude=[math_calc])")
    return str(family)


def task_info(task: str) -> dict:
    return {"suite": SUITE, "task": task, "paper_name": PAPER_NAME[task], "category": CATEGORY[task],
            "language": LANGUAGE[task], "metric": METRIC[task]}


def needle_meta(context: str, start: int, answer: str) -> dict:
    """Evidence spans (every occurrence of the answer in ``context[start:]``) and the depth in percent of the first
    one in the document, for the retrieval tasks read from a file (None when the cut removed the needle)."""
    spans, at = [], context.find(answer, start)
    while answer and at != -1:
        spans.append([at, at + len(answer)])
        at = context.find(answer, at + len(answer))
    length = max(1, len(context) - start)
    depth = int(round(100 * (spans[0][0] - start) / length)) if spans else None
    return {"evidence": spans, "depth": depth, "needle_kept": bool(spans)}


def record_sample(name: str, task: str, family: str, encoder: PromptEncoder, record: dict, index: int,
                  context_length: int) -> Sample:
    """The official prompt of ``record``, truncated as the official scripts do to fit ``context_length`` tokens.

    The truncation budget is ``context_length`` minus the chat template's tokens (0 without one). If the re-encoded
    split prompt still exceeds ``context_length`` (tokenization drift at the cut or at the split), the budget
    shrinks by the excess and the official truncation is redone. The cut must fall inside the document: a budget
    whose halves cannot hold the template's head and the question part is refused."""
    tok = encoder.tokenizer
    parts = prompt_parts(family, task, record)
    overhead = template_overhead(encoder)
    budget = context_length - overhead
    head_n, question_n = fixed_tokens(parts, tok)
    need = 2 * (max(head_n, question_n) + 1) + overhead
    rid = record.get("id", index)
    fitted = False
    for _ in range(MAX_FIT_TRIES):
        if budget < 2:
            break
        trunc = truncate(parts.text, tok, budget)
        if trunc.truncated and budget // 2 <= max(head_n, question_n):
            break  # the cut would reach the template's head or the question
        context, question, answer_prefix, how = split_truncated(parts, trunc)
        n_tokens = encoder.count(context, question, answer_prefix)
        if n_tokens <= context_length:
            fitted = True
            break
        budget = min(budget, trunc.kept_tokens) - (n_tokens - context_length)
    if not fitted:
        raise KvbenchError(f"context_length={context_length} is too small for {name} (record {index}, id {rid!r}): "
                           f"the official middle cut keeps half the budget on each side, and the template's head "
                           f"takes {head_n} tokens and the question part {question_n}; raise context_length "
                           f"(to at least {need})")
    meta: dict[str, Any] = {
        "task": task, "id": record.get("id"), "index": index, "prompt_family": family, "generated": False,
        "truncated": trunc.truncated, "official_prompt_tokens": trunc.n_tokens, "truncation_budget": budget,
        "truncated_tokens": trunc.n_tokens - trunc.kept_tokens, "prompt_tokens": n_tokens, "split": how,
        "context_length": context_length,
    }
    answers = metrics.answers_of(task, record["_label"])
    if task in SYNTHETIC and how != "cut":
        meta.update(needle_meta(context, len(parts.head), answers[0]))
    return Sample(sample_id=f"{task}/{rid}", context=context, question=question, answers=answers,
                  answer_prefix=answer_prefix, max_new_tokens=MAX_NEW_TOKENS[task], meta=meta)


class InfiniteBenchTask(Task):
    """One InfiniteBench task on its official file ``<data_dir>/<task>.jsonl``. Subclassed per task
    (``task_class``)."""

    task: str = ""
    reads_data = True
    finite = True  # n_samples=None: every record

    def __init__(self, data_dir: str | None = None, prompt_family: str = DEFAULT_PROMPT_FAMILY, **params: Any):
        if params:
            raise KvbenchError(f"{self.name}: unknown task option(s) {', '.join(sorted(params))}; allowed: data_dir, "
                               "prompt_family")
        super().__init__(data_dir=data_dir)
        self.prompt_family = check_family(self.name, self.task, prompt_family)
        if data_dir is not None:  # a dir without the file is refused when the run is checked, before any dir is made
            data_file(self.task, data_dir, self.name)
        self._records: list[dict] | None = None

    def records(self) -> list[dict]:
        if self._records is None:
            self._records = load_records(self.task, data_file(self.task, self.data_dir, self.name))
        return self._records

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int | None,
                seed: int) -> list[Sample]:
        records = self.records()
        count = None if n_samples is None else int(n_samples)
        picked = select_indices(len(records), count, int(seed), self.name)
        return [record_sample(self.name, self.task, self.prompt_family, encoder, records[i], i, int(context_length))
                for i in picked]

    def max_questions_per_context(self) -> int:
        """One: the official truncation cuts the whole prompt, question included (and math_find / code_run name the
        question before the document), so two questions about one book get different contexts; grouping them
        would either share a context cut for another question or silently fall back to one question each."""
        return 1

    def score(self, prediction: str, sample: Sample) -> float:
        return metrics.score(self.task, prediction, sample.answers)


_CLASSES: dict[str, type[InfiniteBenchTask]] = {}


def task_class(task: str) -> type[InfiniteBenchTask]:
    """The file-based task class of ``task`` (``name`` and ``info`` as class attributes)."""
    if task not in _CLASSES:
        if task not in TASKS:
            raise KeyError(f"{SUITE}/{task} is not an InfiniteBench task; allowed: {', '.join(TASKS)}")
        attrs = {"task": task, "name": f"{SUITE}/{task}", "info": task_info(task)}
        _CLASSES[task] = type(f"InfiniteBench_{task}", (InfiniteBenchTask,), attrs)
    return _CLASSES[task]
