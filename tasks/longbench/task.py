"""The LongBench task: official records -> official prompt -> pred.py truncation -> (context, question)."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from harness.errors import KvbenchError
from tasks.base import PromptEncoder, Sample, Task
from tasks.longbench import metrics
from tasks.longbench.config import (CATEGORY, DATASETS, E_DATASETS, LANGUAGE, MAX_NEW_TOKENS, METRIC, SKIP_CHAT,
                                    length_bucket)
from tasks.longbench.data import load_records
from tasks.longbench.prompt import build_prompt, split_prompt, truncate

MAX_FIT_TRIES = 8


def select_indices(n_records: int, n_samples: int | None, seed: int, name: str) -> list[int]:
    """All records in file order when n_samples is None or covers them, else a seeded subset (in file order)."""
    if n_samples is None or n_samples >= n_records:
        return list(range(n_records))
    digest = hashlib.sha256(f"kvbench-longbench\x1f{name}\x1f{seed}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return sorted(rng.sample(range(n_records), n_samples))


def template_overhead(encoder: PromptEncoder) -> int:
    """Tokens the harness adds around a prompt beyond the tokenizer's own special tokens (the chat template).

    pred.py truncates the raw prompt to the model's max length and wraps it in the chat template afterwards;
    here the whole wrapped prompt must fit ``context_length``, so the template's tokens come off the budget.
    Zero without a chat template.
    """
    plain = len(encoder.tokenizer("", add_special_tokens=True).input_ids)
    return max(0, encoder.count("", "") - plain)


class LongBenchTask(Task):
    """One LongBench (or LongBench-E) dataset. Subclassed per dataset (see ``task_class``)."""

    dataset: str = ""
    e: bool = False
    skip_chat_template: bool = False
    reads_data = True  # <data_dir>/<dataset>.jsonl
    finite = True  # n_samples=None: every record (the default of task=longbench..., as eviction papers run it)

    def __init__(self, data_dir: str | None = None, **params: Any):
        if params:
            raise KvbenchError(f"{self.name}: unknown task option(s) {', '.join(sorted(params))}; allowed: data_dir")
        super().__init__(data_dir=data_dir)
        self._records: list[dict] | None = None

    # ------------------------------------------------------------------------------------------- data
    @property
    def file_name(self) -> str:
        return f"{self.dataset}_e" if self.e else self.dataset

    def records(self) -> list[dict]:
        if self._records is None:
            records = load_records(self.file_name, self.data_dir)
            if METRIC[self.dataset] == "classification":  # the metric needs the record's label set
                source = Path(self.data_dir) / f"{self.file_name}.jsonl" if self.data_dir else self.file_name
                for i, r in enumerate(records):
                    if not r.get("all_classes"):
                        raise KvbenchError(f"{source}: record {i + 1} (_id {r.get('_id')!r}) has no 'all_classes', "
                                           f"which the {self.dataset} metric needs")
            self._records = records
        return self._records

    # ---------------------------------------------------------------------------------------- prompts
    def build_sample(self, encoder: PromptEncoder, record: dict, index: int, context_length: int) -> Sample:
        """The official prompt of ``record``, truncated like pred.py to fit ``context_length`` tokens.

        The truncation budget is ``context_length`` minus the chat template's tokens (0 without one). If the
        re-encoded split prompt still exceeds ``context_length`` (tokenization drift at the cut or split), the
        budget shrinks by the excess and the official truncation is redone.
        """
        tok = encoder.tokenizer
        context, question_input = str(record["context"]), str(record.get("input") or "")
        full = build_prompt(self.dataset, context, question_input)
        budget = context_length - template_overhead(encoder)
        for _ in range(MAX_FIT_TRIES):
            if budget < 2:
                break
            trunc = truncate(full, tok, budget)
            split = split_prompt(self.dataset, full, context, trunc)
            ctx, question = trunc.prompt[:split], trunc.prompt[split:]
            n_tokens = encoder.count(ctx, question)
            if n_tokens <= context_length:
                break
            budget = min(budget, trunc.n_tokens) - (n_tokens - context_length)
        else:
            budget = -1
        if budget < 2:
            raise KvbenchError(f"context_length={context_length} is too small for {self.name} "
                               f"(sample {index} cannot be truncated to fit)")
        meta: dict[str, Any] = {
            "dataset": self.dataset,
            "language": record.get("language"),
            "length": record.get("length"),
            "all_classes": record.get("all_classes"),
            "_id": record.get("_id"),
            "index": index,
            "truncated": trunc.truncated,
            "official_prompt_tokens": trunc.n_tokens,
            "truncation_budget": budget,
            "prompt_tokens": n_tokens,
        }
        if self.e and record.get("length") is not None:
            meta["length_bucket"] = length_bucket(record["length"])
        return Sample(
            sample_id=str(record.get("_id") or f"{self.file_name}-{index}"),
            context=ctx,
            question=question,
            answers=[str(a) for a in record["answers"]],
            answer_prefix="",  # pred.py has none: the prompt's own "Answer:" ends the user turn of a chat template
            max_new_tokens=MAX_NEW_TOKENS[self.dataset],
            meta=meta,
        )

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int | None,
                seed: int) -> list[Sample]:
        records = self.records()
        count = None if n_samples is None else int(n_samples)
        picked = select_indices(len(records), count, int(seed), self.name)
        return [self.build_sample(encoder, records[i], i, int(context_length)) for i in picked]

    def question_samples(self, encoder: PromptEncoder, context_length: int, n_contexts: int | None,
                         questions: int, seed: int) -> list[Sample]:
        """Records grouped by their document (identical ``context`` field, as LongBench's several questions about
        one paper or story), up to ``questions`` per document, ``n_contexts`` documents (seeded, in file order).
        Every question of a document gets the same truncated context: the one truncated for its longest prompt,
        so each prompt (that context + its own question) still fits ``context_length``."""
        records = self.records()
        documents: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            documents.setdefault(str(r["context"]), []).append(i)
        groups = list(documents.values())
        out: list[Sample] = []
        for g in select_indices(len(groups), n_contexts, int(seed), f"{self.name}/contexts"):
            built = [self.build_sample(encoder, records[i], i, int(context_length)) for i in groups[g][:questions]]
            shared = min(built, key=lambda s: len(s.context)).context  # the most truncated: fits every question
            for j, s in enumerate(built):
                s.context = shared
                s.meta.update({"context_id": built[0].sample_id, "question_index": j,
                               "prompt_tokens": encoder.count(shared, s.question)})
                out.append(s)
        return out

    # ---------------------------------------------------------------------------------------- scoring
    def score(self, prediction: str, sample: Sample) -> float:
        return metrics.score(self.dataset, prediction, sample.answers, sample.meta.get("all_classes"))

    def stop_strings(self) -> list[str]:
        # pred.py stops only on EOS, except samsum (EOS or a "\n" token, with at least one new token). A stop
        # string cannot express "not as the first token", so samsum generates on; the first-line rule at
        # scoring gives the official score whenever the greedy first token is not a bare newline.
        return []


_CLASSES: dict[tuple[str, bool], type[LongBenchTask]] = {}


def task_class(dataset: str, e: bool = False) -> type[LongBenchTask]:
    """The task class of a dataset, with ``skip_chat_template`` and ``info`` as class attributes."""
    key = (dataset, e)
    if key not in _CLASSES:
        allowed = E_DATASETS if e else DATASETS
        if dataset not in allowed:
            suite = "longbench_e" if e else "longbench"
            raise KeyError(f"{suite}/{dataset} is not a {suite} dataset; allowed: {', '.join(allowed)}")
        suite = "longbench_e" if e else "longbench"
        attrs = {
            "dataset": dataset,
            "e": e,
            "name": f"{suite}/{dataset}",
            "skip_chat_template": dataset in SKIP_CHAT,
            "info": {"suite": suite, "dataset": dataset, "category": CATEGORY[dataset],
                     "language": LANGUAGE[dataset], "metric": METRIC[dataset]},
        }
        ident = "".join(ch if ch.isalnum() else "_" for ch in dataset)
        _CLASSES[key] = type(f"LongBench{'E' if e else ''}_{ident}", (LongBenchTask,), attrs)
    return _CLASSES[key]
