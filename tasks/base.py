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
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    # Further questions about this very context (a task building several questions per context while it fits
    # lengths: the prompt must fit with the longest); ``split_questions`` turns them into samples of their own.
    more_questions: list["Sample"] = field(default_factory=list)


def split_questions(sample: "Sample") -> list["Sample"]:
    """A sample and its ``more_questions`` as samples of one context: ids ``<id>/q<j>``, each with
    ``meta["context_id"]`` (the shared context's id) and ``meta["question_index"]`` (j)."""
    out = []
    for j, s in enumerate([sample, *sample.more_questions]):
        meta = {**sample.meta, **(s.meta if s is not sample else {}),
                "context_id": sample.sample_id, "question_index": j}
        out.append(Sample(sample_id=f"{sample.sample_id}/q{j}", context=sample.context, question=s.question,
                          answers=list(s.answers), answer_prefix=s.answer_prefix, max_new_tokens=s.max_new_tokens,
                          meta=meta))
    return out


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

    @classmethod
    def for_task(cls, tokenizer, task: "Task", chat: bool) -> "PromptEncoder":
        """The encoder a task's prompts are built with: the chat layout when asked for (``model.chat``), the
        tokenizer has a chat template and the task does not opt out (``Task.skip_chat_template``)."""
        template = getattr(tokenizer, "chat_template", None)  # a transformers tokenizer attribute, None when absent
        return cls(tokenizer, chat=bool(chat) and template is not None and not task.skip_chat_template)

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
        """Prompt tokens of the sample; of its longest question when it carries ``more_questions``."""
        return max(self.count(sample.context, s.question, s.answer_prefix)
                   for s in (sample, *sample.more_questions))

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
    # Whether the task's prompt is used raw even for a chat model (LongBench's few-shot and code tasks, as its
    # official pred.py does): ``PromptEncoder.for_task`` then skips the chat template.
    skip_chat_template: bool = False
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

    def prediction_meta(self, prediction: str, sample: Sample) -> dict[str, Any]:
        """Facts about one continuation merged into its row's ``meta`` beside ``sample.meta`` (the answer a math
        task extracted, whether a think block closed). Default: none."""
        return {}

    def stop_strings(self) -> list[str]:
        """Generation stops once the decoded continuation contains one of these (besides EOS)."""
        return []

    def lengths(self, context_length: int) -> list[int]:
        """The context lengths the task builds samples for in a run at ``context_length``: that one length, or a
        grid of its own (NIAH's ``task.context_lengths``; each sample then records its length in
        ``meta["context_length"]``). The runner checks them against the model's maximum before anything runs."""
        return [int(context_length)]

    # -- several questions per context (``questions_per_context=K``) ----------------------------------------------
    def max_questions_per_context(self) -> int | None:
        """How many different questions one context of this task can carry: 1 (the default: one question per
        context), a number (a generated task: e.g. the keys hidden in a RULER multi-key haystack), or None for a
        ``finite`` task whose records are grouped by identical context (as many as share one)."""
        return None if self.finite else 1

    def question_samples(self, encoder: PromptEncoder, context_length: int, n_contexts: int | None,
                         questions: int, seed: int) -> list[Sample]:
        """Up to ``questions`` samples per context for ``n_contexts`` contexts, each sample's meta carrying
        ``context_id`` and ``question_index`` (samples of one context are consecutive and share ``context``
        exactly). The default groups a finite task's records by identical context, ``n_contexts`` groups chosen
        by ``seed`` (in file order), keeping the first ``questions`` of each (a context with fewer questions keeps
        those). A task whose truncation depends on the question groups its records itself (LongBench)."""
        if self.max_questions_per_context() is not None:
            raise KvbenchError(f"{self.name} builds one question per context; questions_per_context={questions} is "
                               "for tasks whose contexts carry several (use questions_per_context=1)")
        groups: dict[str, list[Sample]] = {}
        for s in self.samples(encoder, context_length, None, seed):
            groups.setdefault(s.context, []).append(s)
        chosen = list(groups.values())
        if n_contexts is not None and n_contexts < len(chosen):  # a seeded subset of the contexts, in file order
            rng = random.Random(f"kvbench-contexts\x1f{self.name}\x1f{seed}")  # str seeds hash with SHA-512
            chosen = [chosen[i] for i in sorted(rng.sample(range(len(chosen)), n_contexts))]
        out = []
        for group in chosen:
            first = group[0]
            for j, s in enumerate(group[:questions]):  # built for this call: marked in place
                s.meta.update({"context_id": first.sample_id, "question_index": j})
                out.append(s)
        return out


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


# ------------------------------------------------------------------------------------------ length-fitted tasks
ACCEPT_HINT = 0.95  # fill rule: a sample keeps the calibrated haystack size if it fills at least this much
CALIBRATION = "calibration"  # first part of the calibration sample's key (the one sample a search measures)


class TooShort(KvbenchError):
    """A budget that not even the smallest haystack fits (``tokens``: that smallest prompt's length)."""

    def __init__(self, message: str, tokens: int):
        super().__init__(message)
        self.tokens = tokens


def fit_length(measure: Callable[[int], int], limit: int, n_min: int, n_start: int,
               known: dict[int, int] | None = None, max_probes: int = 48,
               good: float = 0.99) -> tuple[int | None, int]:
    """Largest ``n >= n_min`` with ``measure(n) <= limit``: the fill rule's search (``LengthFittedTask.fit_fill``).

    The search stops early at a size that fills at least ``good`` x ``limit`` (saves encodes at long
    lengths, where one unit is a tiny fraction of the budget).
    ``measure`` is (nearly) increasing in ``n``. The bracket is narrowed by linear interpolation toward
    ``limit`` with a bisection every other step, so a search costs a handful of full encodes. Returns
    ``(n, tokens)``; ``n`` is None when even ``n_min`` is too long (``tokens`` is then its length).
    """
    seen: dict[int, int] = dict(known or {})
    lo: tuple[int, int] | None = None
    hi: tuple[int, int] | None = None

    def probe(n: int) -> int:
        nonlocal lo, hi
        if n not in seen:
            seen[n] = measure(n)
        t = seen[n]
        if t <= limit:
            if lo is None or n > lo[0]:
                lo = (n, t)
        elif hi is None or n < hi[0]:
            hi = (n, t)
        return t

    for n in list(seen):
        probe(n)
    n = max(n_min, n_start)
    for step in range(max_probes):
        probe(n)
        if hi is not None and hi[0] <= n_min:
            return None, hi[1]
        if lo is not None and (lo[1] >= good * limit or (hi is not None and hi[0] - lo[0] <= 1)):
            break
        if lo is None:  # everything tried is too long: shrink proportionally (the fixed part makes it safe)
            n0, t0 = hi
            n = max(n_min, min(n0 - 1, int(n0 * limit / t0 * 0.992)))
        elif hi is None:  # everything tried fits: grow along the measured slope
            pts = sorted(seen.items())
            fit_pts = [p for p in pts if p[1] <= limit]
            slope = lo[1] / max(lo[0], 1)  # overestimates the slope (fixed part included): stays below
            if len(fit_pts) >= 2 and fit_pts[-1][0] > fit_pts[0][0]:
                (a, ta), (b, tb) = fit_pts[0], fit_pts[-1]
                if tb > ta:
                    slope = (tb - ta) / (b - a)
            slope = max(slope, 0.25)  # a haystack unit (word, line, document) is never under ~1/4 token
            n = lo[0] + max(1, int((limit - lo[1]) / slope))
        else:
            (n0, t0), (n1, t1) = lo, hi
            if step % 2 == 0 and t1 > t0:
                guess = n0 + int((limit - t0) * (n1 - n0) / (t1 - t0))
            else:
                guess = (n0 + n1) // 2
            n = min(max(guess, n0 + 1), n1 - 1)
    if lo is None:
        return None, hi[1] if hi else 0
    return lo[0], lo[1]


class LengthFittedTask(Task):
    """A task that generates every sample at a token length (RULER's tasks; any synthetic task).

    A subclass implements ``build(encoder, context_length, key, n)``: the sample of random stream ``key`` (a tuple,
    ``sample_key(seed, index)``) with a haystack of ``n`` units (words, lines, documents), every field filled but
    ``sample_id``, and ``score``. ``fit`` picks ``n`` for each sample: by default kvbench's fill rule (``fit_fill``:
    the prompt fits ``context_length`` and fills 95-100% of it where the haystack's granularity allows, the
    generation coming on top); a subclass may add its own rule (RULER's official one: ``tasks.ruler.RulerTask``).
    ``sample`` records in the sample's meta the size, the prompt tokens and the rule (``length_rule``).

    Names are ``<suite>/<short_name>``; ``short_name`` also keys the random streams (``sample_key``) and the
    calibration sample (the one sample a size search measures, once per tokenizer and length).
    """

    suite: str = ""
    short_name: str = ""
    max_new_tokens: int = 32
    n_min: int = 1  # smallest haystack size the fill rule tries
    length_rule: str = "kvbench"  # the rule ``fit`` applies, recorded in every sample's meta
    # Questions per context ``build`` makes (``question_samples`` sets it for its call; the first question is the
    # sample, the others its ``more_questions``). A task supporting more than one overrides
    # ``max_questions_per_context``.
    questions: int = 1

    def __init__(self, data_dir: str | None = None, **params: Any):
        super().__init__(data_dir=data_dir, **params)
        self._hints: dict[tuple, Any] = {}  # searches' results, per (tokenizer, length, ...)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.suite}/{self.short_name}"

    # -- to implement ---------------------------------------------------------------------------------
    @abstractmethod
    def build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int) -> Sample:
        """The sample of random stream ``key`` with haystack size ``n`` (fields filled except sample_id)."""

    def sample_key(self, seed: int, index: int) -> tuple:
        return (self.short_name, seed, index)

    # -- shared by every rule ------------------------------------------------------------------------------
    def _encoder_key(self, encoder: PromptEncoder, context_length: int) -> tuple:
        tok = encoder.tokenizer
        return (type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok), encoder.chat,
                encoder.system_prompt, context_length, self.questions)

    @staticmethod
    def count(encoder: PromptEncoder, s: Sample) -> int:
        return encoder.count_sample(s)

    def _too_short(self, context_length: int, tokens: int) -> TooShort:
        return TooShort(f"{self.name}: context_length={context_length} is too short; its smallest prompt "
                        f"has {tokens} tokens", tokens)

    def calibration_count(self, encoder: PromptEncoder, context_length: int) -> Callable[[int], int]:
        """Prompt tokens of the calibration sample as a function of the haystack size."""
        key = (CALIBRATION, self.short_name)
        return lambda n: self.count(encoder, self.build(encoder, context_length, key, n))

    # -- the fill rule (length_rule=kvbench; a subclass's own rule may fall back on it) -----------------------
    def size_hint(self, encoder: PromptEncoder, context_length: int, limit: int | None = None) -> int:
        """The largest haystack size of the calibration sample whose prompt fits ``limit`` (default
        ``context_length``); TooShort when not even ``n_min`` does."""
        limit = context_length if limit is None else limit
        k = (*self._encoder_key(encoder, context_length), limit)
        if k not in self._hints:
            n, t = fit_length(self.calibration_count(encoder, context_length), limit, self.n_min, self.n_min)
            if n is None:
                raise self._too_short(context_length, t)
            self._hints[k] = n
        return self._hints[k]

    def fit_fill(self, encoder: PromptEncoder, context_length: int, key: tuple, limit: int) -> tuple[Sample, int, int]:
        """kvbench's fill rule: (sample, size, prompt tokens) whose prompt fits ``limit`` and fills 95-100% of it
        where the haystack's granularity allows; TooShort when not even ``n_min`` fits."""
        n = self.size_hint(encoder, context_length, limit)
        built: dict[int, Sample] = {}

        def measure(m: int) -> int:
            built[m] = self.build(encoder, context_length, key, m)
            return self.count(encoder, built[m])

        t = measure(n)
        if not (ACCEPT_HINT * limit <= t <= limit):
            n, t = fit_length(measure, limit, self.n_min, n, known={n: t})
            if n is None:
                raise self._too_short(context_length, t)
        return built[n], n, t

    def fit(self, encoder: PromptEncoder, context_length: int, key: tuple) -> tuple[Sample, int, int, str | None]:
        """(sample, haystack size, prompt tokens, fallback) of stream ``key``: the fill rule on the whole
        ``context_length`` (no fallback)."""
        return (*self.fit_fill(encoder, context_length, key, context_length), None)

    def sample(self, encoder: PromptEncoder, context_length: int, seed: int, index: int) -> Sample:
        key = self.sample_key(seed, index)
        s, n, t, fallback = self.fit(encoder, context_length, key)
        s.sample_id = f"{self.name}/L{context_length}/s{seed}/{index}"
        s.meta.update({"seed": seed, "index": index, "n_haystack": n, "prompt_tokens": t,
                       "context_length": context_length, "tokens_to_generate": self.max_new_tokens,
                       "length_rule": self.length_rule, "length_fallback": fallback})
        return s

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int, seed: int) -> list[Sample]:
        return [self.sample(encoder, context_length, seed, i) for i in range(n_samples)]

    def question_samples(self, encoder: PromptEncoder, context_length: int, n_contexts: int | None,
                         questions: int, seed: int) -> list[Sample]:
        """``questions`` samples for each of ``n_contexts`` contexts: ``build`` makes every question of a context
        at once and the length is fitted to the longest prompt (``PromptEncoder.count_sample``)."""
        limit = self.max_questions_per_context()
        if limit is not None and questions > limit:
            raise KvbenchError(f"{self.name}: questions_per_context={questions} is more than its contexts carry "
                               f"(at most {limit} different questions each); allowed: 1..{limit}")
        self.questions = questions
        try:
            contexts = self.samples(encoder, context_length, n_contexts, seed)
        finally:
            self.questions = 1
        return [q for s in contexts for q in split_questions(s)]
