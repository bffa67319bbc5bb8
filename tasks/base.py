"""The task protocol: a loader that yields prompts, and a metric that scores a prediction.

A task never sees the model: it gets a ``PromptEncoder`` that counts and encodes prompts exactly as the
harness will feed them (special tokens, chat template), so that length fitting and truncation are done
in the model's own tokens.

A prompt is split in two parts because eviction methods are usually evaluated *query-agnostic*
(kvpress's convention): the ``context`` is prefilled and compressed before the ``question`` is seen.
Without a chat template the text the model sees is ``context + question + answer_prefix``; with one, the
answer prefix opens the assistant's reply (see ``PromptEncoder``).
"""
from __future__ import annotations

import functools
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
    """Turns a sample (context, question, answer prefix) into token ids the way the harness prefills them.

    Without a chat template the text is ``context + question + answer_prefix`` (RULER's ``base`` model template,
    LongBench's raw prompt); the context is encoded with the tokenizer's special tokens (BOS), the rest without.

    With ``chat=True`` the text is official RULER's layout for chat models (prepare.py: the model's chat template
    around the task input, then the answer prefix, which so begins the assistant's reply)::

        apply_chat_template([{"role": "user", "content": context + question}], add_generation_prompt=True)
          + answer_prefix

    split where kvpress's pipeline splits it: the context part is the template up to the end of the context
    (BOS, user header, context), the question part the question, the rest of the template (end of turn,
    assistant header) and the answer prefix. Query-agnostic runs prefill and compress the context part first;
    query-aware runs prefill both parts. Both parts are encoded without added special tokens (the template
    carries them).
    """

    MARKER = "\x00KVBENCH_SPLIT\x00"

    def __init__(self, tokenizer, chat: bool = False, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.chat = chat
        self.system_prompt = system_prompt

    def _wrap(self, context: str, question: str, answer_prefix: str = "") -> tuple[str, str]:
        """The text of the context part and of the question part (answer prefix included)."""
        if not self.chat:
            return context, question + answer_prefix
        messages = [{"role": "user", "content": context + self.MARKER + question}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = text.split(self.MARKER)
        if len(parts) != 2:
            raise KvbenchError("the tokenizer's chat template does not keep the user message as one piece of text "
                               "(cannot split context from question); run without it: model.chat=false")
        head, tail = parts
        return head, tail + answer_prefix

    def text(self, context: str, question: str, answer_prefix: str = "") -> str:
        """The whole text the model sees."""
        return "".join(self._wrap(context, question, answer_prefix))

    def encode(self, context: str, question: str, answer_prefix: str = "") -> tuple[list[int], list[int]]:
        """Token ids of the context part and of the question part (the answer prefix ends the latter)."""
        context, question = self._wrap(context, question, answer_prefix)
        tok = self.tokenizer
        ctx_ids = tok(context, add_special_tokens=not self.chat).input_ids
        q_ids = tok(question, add_special_tokens=False).input_ids
        return list(ctx_ids), list(q_ids)

    def count(self, context: str, question: str, answer_prefix: str = "") -> int:
        ctx_ids, q_ids = self.encode(context, question, answer_prefix)
        return len(ctx_ids) + len(q_ids)

    def context_token_indices(self, context: str, spans: list[list[int]]) -> list[int]:
        """Indices (in the encoded context) of the tokens overlapping any character span ``[start, end)``."""
        wrapped, _ = self._wrap(context, "")
        # The context ends the wrapped text; a template may strip its leading whitespace (Llama 3's ``| trim``).
        if not wrapped.endswith(context.lstrip()):
            raise KvbenchError("the tokenizer's chat template changes the context text; evidence spans cannot be "
                               "placed on its tokens (run with model.chat=false)")
        shift = len(wrapped) - len(context)
        enc = self.tokenizer(wrapped, add_special_tokens=not self.chat, return_offsets_mapping=True)
        hits = []
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if end <= start:
                continue  # special tokens
            if any(start < e + shift and end > b + shift for b, e in spans):
                hits.append(i)
        return hits

    def encode_sample(self, sample: Sample) -> tuple[list[int], list[int]]:
        return self.encode(sample.context, sample.question, sample.answer_prefix)

    def count_sample(self, sample: Sample) -> int:
        return self.count(sample.context, sample.question, sample.answer_prefix)

    def text_sample(self, sample: Sample) -> str:
        return self.text(sample.context, sample.question, sample.answer_prefix)


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
    # Whether the task is a fixed set of records, so that ``n_samples=None`` means all of them (LongBench). A task
    # that generates its samples (RULER) has no "all" and refuses None (``samples`` of every subclass is checked).
    finite: bool = False

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("samples")
        if own is not None and not getattr(own, "__isabstractmethod__", False):
            cls.samples = _checked_count(own)

    def __init__(self, data_dir: str | None = None, **params: Any):
        if data_dir is not None and not Path(str(data_dir)).expanduser().is_dir():
            # checked here, not where a file is opened: a misspelt dir must not pass for "no data given"
            raise KvbenchError(f"{self.name}: task.data_dir={str(data_dir)!r} is not an existing directory; "
                               "pass the directory holding the task's data files")
        self.data_dir = data_dir
        self.params = params

    @abstractmethod
    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int, seed: int) -> list[Sample]:
        """Exactly ``n_samples`` samples (fewer only if the dataset has fewer), deterministic in ``seed``;
        ``n_samples=None``: every record of a ``finite`` task (refused by the others)."""

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """Official per-sample score in [0, 1] of a raw model continuation (post-processing included)."""

    def stop_strings(self) -> list[str]:
        """Generation stops once the decoded continuation contains one of these (besides EOS)."""
        return []


def _checked_count(samples):
    """``Task.samples`` refusing ``n_samples=None`` (all samples) for a task that generates its samples."""
    if getattr(samples, "_kvbench_checked", False):
        return samples

    @functools.wraps(samples)
    def checked(self, encoder, context_length, n_samples, *args, **kwargs):
        if n_samples is None and not self.finite:
            raise KvbenchError(f"{self.name} generates its samples, so n_samples=null (all samples) has no meaning "
                               "for it; pass n_samples=<number>")
        return samples(self, encoder, context_length, n_samples, *args, **kwargs)

    checked._kvbench_checked = True
    return checked
