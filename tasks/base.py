"""The task protocol: a loader that yields prompts, and a metric that scores a prediction.

A task never sees the model: it gets a ``PromptEncoder`` that counts and encodes prompts exactly as the
harness will feed them (special tokens, chat template), so that length fitting and truncation are done
in the model's own tokens.

A prompt is split in two parts because eviction methods are usually evaluated *query-agnostic*
(kvpress's convention): the ``context`` is prefilled and compressed before the ``question`` is seen.
The text the model sees is always ``context + question + answer_prefix``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import KvbenchError


@dataclass
class Sample:
    sample_id: str
    context: str  # compressible part (prefilled first)
    question: str  # appended after compression when query_aware=false
    answers: list[str]
    answer_prefix: str = ""  # the prompt ends with it, so the first generated tokens are the answer
    max_new_tokens: int = 32
    # Task-specific facts: needle depth, evidence character spans in ``context`` (list of [start, end]),
    # all_classes for classification metrics, length bucket, haystack kind, ...
    meta: dict[str, Any] = field(default_factory=dict)


class PromptEncoder:
    """Turns (context, question + answer_prefix) into token ids the way the harness prefills them.

    The context is encoded with the tokenizer's special tokens (BOS), the question without; with
    ``chat=True`` the user turn is wrapped in the tokenizer's chat template and the split point is kept.
    """

    def __init__(self, tokenizer, chat: bool = False, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.chat = chat
        self.system_prompt = system_prompt

    def _wrap(self, context: str, question: str) -> tuple[str, str]:
        if not self.chat:
            return context, question
        marker = "\x00KVBENCH_SPLIT\x00"
        messages = [{"role": "user", "content": context + marker + question}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker)
        return head, tail

    def encode(self, context: str, question: str) -> tuple[list[int], list[int]]:
        """Token ids of the context part and of the question part (question includes the answer prefix)."""
        context, question = self._wrap(context, question)
        tok = self.tokenizer
        ctx_ids = tok(context, add_special_tokens=not self.chat).input_ids
        q_ids = tok(question, add_special_tokens=False).input_ids
        return list(ctx_ids), list(q_ids)

    def count(self, context: str, question: str) -> int:
        ctx_ids, q_ids = self.encode(context, question)
        return len(ctx_ids) + len(q_ids)

    def context_token_indices(self, context: str, spans: list[list[int]]) -> list[int]:
        """Indices (in the encoded context) of the tokens overlapping any character span ``[start, end)``."""
        wrapped, _ = self._wrap(context, "")
        shift = wrapped.find(context) if self.chat else 0
        enc = self.tokenizer(wrapped, add_special_tokens=not self.chat, return_offsets_mapping=True)
        hits = []
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if end <= start:
                continue  # special tokens
            if any(start < e + shift and end > b + shift for b, e in spans):
                hits.append(i)
        return hits

    def encode_sample(self, sample: Sample) -> tuple[list[int], list[int]]:
        return self.encode(sample.context, sample.question + sample.answer_prefix)


class Task(ABC):
    """One dataset: ``samples()`` builds the prompts, ``score()`` is the official per-sample metric in [0, 1]."""

    name: str = ""
    # Dict-free, JSON-able facts the report may use (e.g. {"suite": "ruler", "category": "synthetic"}).
    info: dict[str, Any] = {}
    # Whether the task reads files from ``task.data_dir``. One that does not refuses a data_dir when run alone
    # (``tasks.get_task``): the user meant another task, or expects the files to be used; in a suite the suite's
    # data_dir is for the members that read it. A class serving several tasks (RULER's NiahTask) may set it
    # per instance, before ``Task.__init__``.
    reads_data: bool = False

    def __init__(self, data_dir: str | None = None, **params: Any):
        if data_dir is not None and not Path(str(data_dir)).expanduser().is_dir():
            # checked here, not where a file is opened: a misspelt dir must not pass for "no data given"
            raise KvbenchError(f"{self.name}: task.data_dir={str(data_dir)!r} is not an existing directory; "
                               "pass the directory holding the task's data files")
        self.data_dir = data_dir
        self.params = params

    @abstractmethod
    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int, seed: int) -> list[Sample]:
        """Exactly ``n_samples`` samples (fewer only if the dataset has fewer), deterministic in ``seed``."""

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """Official per-sample score in [0, 1] of a raw model continuation (post-processing included)."""

    def stop_strings(self) -> list[str]:
        """Generation stops once the decoded continuation contains one of these (besides EOS)."""
        return []
