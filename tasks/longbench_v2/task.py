"""The LongBench v2 task: data.json records of one domain -> official prompt -> pred.py truncation -> samples.

``cot=false``: 0shot.txt, 128 new tokens, the answer extracted from the response (pred.py without --cot).
``cot=true``: 0shot_cot.txt, one generation of 1024 + 128 tokens whose answer is extracted by the same official
extractor. pred.py runs two calls instead (the reasoning, then 0shot_cot_ans.txt with the reasoning pasted in and
the document omitted); kvbench decodes once per sample, so a reasoning that never writes "The correct answer is
(X)" scores 0 here where pred.py's second call would still ask for the letter. Rows record the mode
(``meta.prompt``, ``meta.cot_mode``); docs/longbench_v2.md.
"""
from __future__ import annotations

from typing import Any

from harness.errors import KvbenchError
from harness.schema import parse_flag
from tasks.base import PromptEncoder, Sample, Task
from tasks.longbench.task import MAX_FIT_TRIES, select_indices, template_overhead
from tasks.longbench_v2 import metrics
from tasks.longbench_v2.config import DOMAINS, MAX_NEW_TOKENS
from tasks.longbench_v2.data import data_path, load_records
from tasks.longbench_v2.prompt import official_prompt, split_truncated, truncate

SUITE = "longbench_v2"
OPTIONS = ("data_dir", "cot")


class LongBenchV2Task(Task):
    """The questions of one LongBench v2 domain. Subclassed per domain (``task_class``)."""

    short_name: str = ""
    domain: str = ""
    reads_data = True  # <data_dir>/data.json
    finite = True  # n_samples=None: every question of the domain

    def __init__(self, data_dir: str | None = None, cot: Any = False, **params: Any):
        if params:
            raise KvbenchError(f"{self.name}: unknown task option(s) {', '.join(sorted(params))}; allowed: "
                               f"{', '.join(OPTIONS)}")
        flag = parse_flag(cot)
        if not isinstance(flag, bool):
            raise KvbenchError(f"{self.name}: task.cot={cot!r} is not allowed; allowed: true (0shot_cot.txt, one "
                               "reasoning pass) or false (0shot.txt), spelt true/false, yes/no or 1/0")
        super().__init__(data_dir=data_dir)
        if data_dir is not None:
            data_path(data_dir)  # a dir without data.json is refused when the run is checked, before its dir is made
        self.cot = flag
        self.template = "0shot_cot" if flag else "0shot"
        self._records: list[dict] | None = None

    def records(self) -> list[dict]:
        if self._records is None:
            self._records = load_records(self.data_dir, self.domain)
        return self._records

    # ---------------------------------------------------------------------------------------- prompts
    def build_sample(self, encoder: PromptEncoder, record: dict, context_length: int) -> Sample:
        """The official prompt of ``record``, truncated like pred.py to fit ``context_length`` tokens.

        The truncation budget is ``context_length`` minus the chat template's tokens (0 without one); if the
        re-encoded split prompt still exceeds ``context_length`` (tokenization drift at the cut), the budget
        shrinks by the excess and the official truncation is redone. The question and its choices must survive
        whole in the kept end (pred.py keeps the last half of the budget), else the length is refused.
        """
        head, tail = official_prompt(record, self.template)
        budget = context_length - template_overhead(encoder)
        fitted = None
        for _ in range(MAX_FIT_TRIES):
            if budget < 2:
                break
            trunc = truncate(head + tail, encoder.tokenizer, budget)
            split = split_truncated(trunc.prompt, tail)
            if split is None:
                break
            ctx, question = trunc.prompt[:split], trunc.prompt[split:]
            n_tokens = encoder.count(ctx, question)
            if n_tokens <= context_length:
                fitted = (ctx, question, trunc, n_tokens)
                break
            budget = min(budget, trunc.n_tokens) - (n_tokens - context_length)
        if fitted is None:
            need = encoder.count("", tail)
            raise KvbenchError(f"{self.name}: context_length={context_length} is too short for question "
                               f"{record['_id']!r}: its question and choices alone take {need} tokens and pred.py's "
                               f"truncation keeps only the last half of the budget; use context_length >= "
                               f"{2 * need + template_overhead(encoder) + 2}")
        ctx, question, trunc, n_tokens = fitted
        meta: dict[str, Any] = {
            "_id": record["_id"], "domain": record["domain"], "sub_domain": record["sub_domain"],
            "difficulty": record["difficulty"], "length": record["length"], "answer": record["answer"],
            "prompt": self.template, "cot_mode": "single_pass" if self.cot else None,
            "truncated": trunc.truncated, "official_prompt_tokens": trunc.n_tokens, "truncation_budget": budget,
            "prompt_tokens": n_tokens,
        }
        return Sample(sample_id=record["_id"], context=ctx, question=question, answers=[record["answer"]],
                      answer_prefix="",  # pred.py has none: the chat template's assistant turn follows the prompt
                      max_new_tokens=MAX_NEW_TOKENS[self.template], meta=meta)

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int | None,
                seed: int) -> list[Sample]:
        records = self.records()
        count = None if n_samples is None else int(n_samples)
        picked = select_indices(len(records), count, int(seed), self.name)
        return [self.build_sample(encoder, records[i], int(context_length)) for i in picked]

    # ---------------------------------------------------------------------------------------- scoring
    def score(self, prediction: str, sample: Sample) -> float:
        return float(metrics.judge(prediction, sample.answers[0]))


_CLASSES: dict[str, type[LongBenchV2Task]] = {}


def task_class(short_name: str) -> type[LongBenchV2Task]:
    """The task class of a domain ('single_doc_qa', ...), with ``name`` and ``info`` as class attributes."""
    if short_name not in DOMAINS:
        raise KeyError(f"{SUITE}/{short_name} is not a {SUITE} task; allowed: {', '.join(DOMAINS)}")
    if short_name not in _CLASSES:
        attrs = {"short_name": short_name, "domain": DOMAINS[short_name], "name": f"{SUITE}/{short_name}",
                 "info": {"suite": SUITE, "domain": DOMAINS[short_name], "metric": "accuracy"}}
        _CLASSES[short_name] = type(f"LongBenchV2_{short_name}", (LongBenchV2Task,), attrs)
    return _CLASSES[short_name]
