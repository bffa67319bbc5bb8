"""Training data of the reference model's v2 recipe (kvbench issue #28): every offline RULER format, and prose.

Two kinds of rows on top of v1's mix (``harness.reference.data``):

- ``RulerFormats``: samples of the 11 offline RULER tasks (niah_single_1/2/3, niah_multikey_1/2/3,
  niah_multivalue, niah_multiquery, vt, cwe, fwe) built by the harness's own generators (``tasks.ruler``) with
  training seeds >= 1_000_000, so the prompts are exactly what ``task=ruler/...`` prefills (official RULER's
  length rule, the model's tokenizer) and the evaluation samples (seeds < 1000) are never seen. The supervised
  target is the answer in the format the prompt itself shows: niah's ``" a, b, and c."`` (values in the order
  the question asks for them, several values of one key in the order they appear), vt's and cwe's as their
  solved example writes them, fwe's ranks 2-4 in rank order.
- ``prose_example``: natural-language-like text with a language-modelling loss on every token, a share of the
  mix so that attention is shaped by text as well as by retrieval prompts. The text is CPython's own reference
  documentation (``pydoc_data.topics``, shipped inside every CPython; human-written English), stdlib docstrings
  and the v1 template prose, or RULER's noise lines. In most rows a few facts (needle-like sentences) are
  stated and then come back uncued later, whole or as their value alone, as names and numbers recur in real
  text: predicting a recurrence at an arbitrary sentence end needs heads that, from ordinary positions, attend
  to the salient items seen so far, which is what a query-agnostic scorer (SnapKV's window of the context's
  last tokens, ExpectedAttention's average query) reads. The recurrences carry the full loss weight.

Randomness comes only from the ``random.Random`` passed in (the RULER samples: from a training seed drawn
from it), so a seed fixes the data.
"""
from __future__ import annotations

import functools
import random

from harness.reference.data import (ADJECTIVES, NOUNS, Example, doc_sentences, essay_sentences, grammar_sentence,
                                    rand_of)
from tasks.ruler.templates import NOISE, join_items, needle_sentence

OFFLINE_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                 "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
# Training prompts are built at these lengths only: tasks/ruler fits each (tokenizer, length) once (a search
# over haystack sizes), so a fixed set keeps that cost to one search per length and task.
LENGTHS = (384, 512, 768, 1024, 1536, 2048, 2560, 3072, 3584, 4096)
# Shortest length per task at which official RULER's generator fits a prompt with the reference tokenizer
# (measured; below it tasks/ruler fits one below the official range and logs it): the essay haystack steps by
# 500 words, vt's solved example alone is up to ~500 tokens, cwe's example list ~300.
MIN_LENGTH = {"niah_single_1": 512, "niah_single_2": 1024, "niah_single_3": 1024, "niah_multikey_1": 1024,
              "niah_multikey_2": 384, "niah_multikey_3": 768, "niah_multivalue": 1024, "niah_multiquery": 1024,
              "vt": 1024, "cwe": 1536, "fwe": 384}
TRAIN_SEED_MIN = 1_000_000
# Draw weights of the formats: the tasks v1 never trained on, or scored lowest on, are drawn more often.
FORMAT_WEIGHTS = {"niah_single_1": 1, "niah_single_2": 1, "niah_single_3": 1.5, "niah_multikey_1": 1.5,
                  "niah_multikey_2": 1.5, "niah_multikey_3": 2, "niah_multivalue": 2, "niah_multiquery": 2,
                  "vt": 1.5, "cwe": 2.5, "fwe": 2.5}


def ruler_target(name: str, sample) -> str:
    """The supervised answer text of a RULER sample, after its answer prefix."""
    answers = list(sample.answers)
    if name == "vt":  # the solved example's answer: " " + names (the prefix ends in "they are: ")
        return " " + " ".join(answers)
    if name == "cwe":  # the solved example's answer: " 1. word 2. word ..."
        return " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answers))
    if name == "fwe":  # ranks 2-4, most frequent first
        return " " + ", ".join(answers) + "."
    if name == "niah_multivalue":  # the values of one key, in the order the text gives them
        answers.sort(key=sample.context.find)
    return " " + join_items(answers) + "."


class RulerFormats:
    """Training examples of the offline RULER tasks, from ``tasks.ruler`` with training seeds."""

    def __init__(self, tokenizer, names: tuple[str, ...] = OFFLINE_TASKS):
        from tasks.base import PromptEncoder
        from tasks.ruler import make_task

        self.encoder = PromptEncoder(tokenizer)
        self.tasks = {name: make_task(name) for name in names}
        self.names = list(names)
        self.weights = [FORMAT_WEIGHTS.get(n, 1.0) for n in names]

    def length_for(self, name: str, n_tokens: int) -> int:
        """The largest training length <= ``n_tokens`` (at least the task's shortest)."""
        fits = [L for L in LENGTHS if L <= n_tokens] or [LENGTHS[0]]
        return max(fits[-1], MIN_LENGTH.get(name, LENGTHS[0]))

    def example(self, rng: random.Random, n_tokens: int, name: str | None = None) -> Example:
        """One task's training prompt of at most ``n_tokens`` (prompt + RULER's generation budget; a task whose
        shortest official prompt is longer is not drawn for it), or of ``name`` at its shortest length."""
        if name is None:
            floor = max(n_tokens, min(MIN_LENGTH.get(n, 0) for n in self.names))  # else the shortest tasks
            fit = [(n, w) for n, w in zip(self.names, self.weights) if MIN_LENGTH.get(n, 0) <= floor]
            names, weights = zip(*fit)
            name = rng.choices(names, weights=weights)[0]
        sample = self.sample(name, self.length_for(name, n_tokens), rng, TRAIN_SEED_MIN, 2**62)
        return Example(sample.context, [(sample.question + sample.answer_prefix, ruler_target(name, sample))],
                       name)


    def sample(self, name: str, length: int, rng: random.Random, low: int, high: int, tries: int = 4):
        """tasks/ruler's sample of ``name`` for a seed drawn from [low, high): a seed whose prompt cannot fit is
        replaced by the next draw (cwe at 4k with a tokenizer whose 4k-configuration prompt only just fits:
        tasks/ruler checks that on its calibration sample, and a sample with longer words overflows)."""
        from tasks.base import TooShort

        for attempt in range(tries):
            try:
                return self.tasks[name].sample(self.encoder, length, rng.randrange(low, high), 0)
            except TooShort:
                if attempt == tries - 1:
                    raise


# --- prose ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def manual_paragraphs() -> tuple[str, ...]:
    """Paragraphs of CPython's reference documentation (``pydoc_data.topics``, in the standard library), the
    ones that read as prose (code listings and tables left out); empty where the module is absent."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - a stripped stdlib
        return ()
    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            text = " ".join(line.strip() for line in para.splitlines())
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) > 80 and letters > 0.9 * len(text) and text[0].isupper() and text.endswith("."):
                out.append(text)
    return tuple(out)


def prose_units(rng: random.Random, n_words: int) -> list[str]:
    """Sentences (or noise lines) of about ``n_words`` words from one source, in reading order."""
    src = rng.random()
    units: list[str] = []
    count = 0
    paragraphs = manual_paragraphs()
    if src < 0.45 and paragraphs:  # the manual, consecutive paragraphs from a random one
        i = rng.randrange(len(paragraphs))
        while count < n_words:
            for s in paragraphs[i % len(paragraphs)].split(". "):
                s = s if s.endswith(".") else s + "."
                units.append(s)
                count += s.count(" ") + 1
            i += 1
    elif src < 0.65:  # RULER's noise lines (niah_single_1 and vt's haystack)
        while count < n_words:
            units.append(NOISE)
            count += NOISE.count(" ") + 1
    else:  # essays (RULER's essay haystack) or docstrings and template prose
        while count < n_words:
            if rng.random() < 0.5:
                batch = essay_sentences(rng, 8)
            else:
                batch = [rng.choice(doc_sentences()) if rng.random() < 0.6 else grammar_sentence(rng)
                         for _ in range(8)]
            units.extend(batch)
            count += sum(s.count(" ") + 1 for s in batch)
    return units


def fact_sentence(rng: random.Random) -> tuple[str, str, str]:
    """(sentence, key, value): a RULER needle or another statement of a key and a value."""
    r = rng.random()
    value = rand_of(rng.choice(["numbers", "numbers", "words", "uuids"]), rng)
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}" if rng.random() < 0.7 else rand_of("uuids", rng)
    if r < 0.6:
        kind = "numbers" if value.isdigit() else ("uuids" if value.count("-") == 4 else "words")
        return needle_sentence(kind, key, value), key, value
    if r < 0.8:
        return f"The code of the {key} account is {value}.", key, value
    return f"Remember that {key} stands for {value}.", key, value


def prose_example(rng: random.Random, n_tokens: int, weight: float = 0.5, recur_share: float = 0.7,
                  mention_rate: float = 0.2) -> Example:
    """A prose row: LM loss (``weight``) on every token; in ``recur_share`` of rows 1-4 facts stated in the
    first 70%, and after each later sentence (or noise line), with probability ``mention_rate``, a mention of
    one fact stated so far: its key (half the time), its value, or the whole fact (those tokens weighted 1).
    Mentions are frequent and uncued, as names recur in real text: predicting the first token of a key at an
    arbitrary sentence end pays only when ordinary positions attend to the facts seen so far."""
    units = prose_units(rng, int(n_tokens * 0.5))  # ~1.5-2 tokens per word with the reference BPE
    sep = "\n" if units and units[0] == NOISE else " "
    segments: list[tuple[str, float]] = []
    if rng.random() >= recur_share or len(units) < 2:
        segments.append((sep.join(units), weight))
        return Example("", [], "prose", segments=segments)
    n_facts = rng.randint(1, 4)
    # a fact at a random place in the first 70%, its recurrences after it
    events: dict[int, list[tuple[str, float]]] = {}
    stated: dict[int, list[tuple[str, str, str]]] = {}
    for _ in range(n_facts):
        at = rng.randrange(0, max(1, int(len(units) * 0.7)))
        fact = fact_sentence(rng)
        stated.setdefault(at, []).append(fact)
        events.setdefault(at, []).append((fact[0], weight))
    known: list[tuple[str, str, str]] = []
    for i in range(len(units) + 1):
        if known and rng.random() < mention_rate:
            sentence, key, value = rng.choice(known)
            r = rng.random()
            events.setdefault(i, []).append((key + "." if r < 0.5 else value + "." if r < 0.8 else sentence, 1.0))
        known.extend(stated.get(i, []))
    text: list[str] = []
    for i in range(len(units) + 1):
        for piece, w in events.get(i, []):
            if text:
                segments.append((sep.join(text) + sep, weight))
                text = []
            segments.append((piece + sep, w))
        if i < len(units):
            text.append(units[i])
    if text:
        segments.append((sep.join(text), weight))
    return Example("", [], "prose", segments=segments)


def sample_example_v2(rng: random.Random, n_tokens: int, formats: RulerFormats, copy_share: float = 0.05,
                      prose_share: float = 0.25, prose_weight: float = 0.5, v1_share: float = 0.15) -> Example:
    """The v2 training mix: prose, v1's varied retrieval tasks (and list copying), else an offline RULER format."""
    from harness.reference.data import copy_task, sample_example

    r = rng.random()
    if r < prose_share:
        return prose_example(rng, n_tokens, prose_weight)
    if r < prose_share + copy_share:
        return copy_task(rng, n_tokens)
    if r < prose_share + copy_share + v1_share:
        return sample_example(rng, n_tokens, copy_share=0.0)
    return formats.example(rng, n_tokens)


def focus_example_v2(rng: random.Random, n_tokens: int, formats: RulerFormats, prose_share: float = 0.15,
                     prose_weight: float = 0.5) -> Example:
    """The v2 focus phase: the RULER formats at long lengths, some prose kept."""
    if rng.random() < prose_share:
        return prose_example(rng, n_tokens, prose_weight)
    return formats.example(rng, n_tokens)
