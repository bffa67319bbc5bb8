"""``longgen/recite``: recite a long number hidden in a haystack, so that the answer itself is long.

The prompt is RULER's niah_single_1 (official NVIDIA/RULER scripts/data/synthetic/constants.py template in the
singular, niah.py's needle sentence and noise haystack: tasks/ruler/templates.py), with one change: the needle's
value is a number of ``task.digits`` digits (256 by default) instead of 7, so reciting it takes hundreds of
generated tokens on a tokenizer that splits digits (the reference model's: one token per digit)::

    A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about
    the number afterwards.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.
    ...
    One of the special magic numbers for <key> is: <digits>.
    ...
    What is the special magic number for <key> mentioned in the provided text? The special magic number for <key>
    mentioned in the provided text is

Why a number: the reference model (harness/reference) copies digit strings from its context (it was trained on
7-digit needles and uuids) but not lists of words or random tokens (docs/longgen.md has the measurements). The
digits are drawn so that copying by matching the last few generated digits stays unambiguous (``digit_string``):
no ``unique_ngram``-gram occurs twice and no digit repeats within ``repeat_gap`` places.

Reciting needs the needle (in the prompt) and the digits generated so far (the place reached), so an eviction
method that keeps the rest of the needle and the recent tokens can recite it, one that keeps only recent tokens
cannot once the needle has left its window. ``meta["evidence"]``: the needle's digits in ``context``.

Length: kvbench's fill rule (``tasks.base.LengthFittedTask``): the prompt fills 95-100% of the length, the
generation comes on top (``max_new_tokens``: the answer's tokens + ``MARGIN``). ``task.context_lengths``: a grid
of lengths in one run (each sample records its own in ``meta["context_length"]``).
"""
from __future__ import annotations

import math
import random
from typing import Any

from harness.errors import KvbenchError
from tasks.base import LengthFittedTask, PromptEncoder, Sample
from tasks.longgen.metric import DEFAULT_CHUNK, DEFAULT_METRIC, check_metric, recite_score
from tasks.ruler.common import TextBuilder, load_essays, make_sample, random_word_key, rng_for
from tasks.ruler.templates import NOISE, needle_sentence, niah_prompt

NAME = "longgen/recite"
HAYSTACKS = ("noise", "essay")  # RULER's noise sentence repeated (niah_single_1), or essays (niah_single_2)
MARGIN = 16  # generated tokens allowed past the answer's own (" <digits>."): room for a stray separator
ATTEMPTS = 200  # restarts of the digit walk before the options are called too tight
PARAMS = ("data_dir", "digits", "chunk", "unique_ngram", "repeat_gap", "haystack", "depth", "metric",
          "context_lengths")


def _error(text: str) -> KvbenchError:
    return KvbenchError(f"{NAME}: {text}")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def allowed_ngrams(unique_ngram: int, repeat_gap: int) -> int:
    """How many different ``unique_ngram``-grams of digits obey ``repeat_gap`` (each digit unlike the
    ``repeat_gap`` before it): 10 x 9 x ... choices, one factor per place."""
    return math.prod(10 - min(i, repeat_gap) for i in range(unique_ngram))


def digit_string(rng: random.Random, digits: int, unique_ngram: int, repeat_gap: int) -> str:
    """``digits`` random digits in which no ``unique_ngram``-gram occurs twice (0: no such rule) and no digit equals
    one of the ``repeat_gap`` before it: a walk choosing each digit uniformly among those allowed, restarted
    where it runs out of choices."""
    for _ in range(ATTEMPTS):
        out: list[str] = []
        seen: set[str] = set()
        while len(out) < digits:
            recent = out[max(0, len(out) - repeat_gap):] if repeat_gap else []
            tail = "".join(out[len(out) - unique_ngram + 1:]) if unique_ngram and len(out) >= unique_ngram - 1 else None
            options = [d for d in "0123456789" if d not in recent and (tail is None or tail + d not in seen)]
            if not options:
                break
            d = rng.choice(options)
            if tail is not None:
                seen.add(tail + d)
            out.append(d)
        if len(out) == digits:
            return "".join(out)
    raise _error(f"no {digits}-digit number with unique_ngram={unique_ngram} and repeat_gap={repeat_gap} was found in "
                 f"{ATTEMPTS} tries; use fewer digits, a longer unique_ngram or a smaller repeat_gap")


def check_lengths(value: object) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise _error(f"task.context_lengths={value!r} must be a non-empty list of token lengths, e.g. [1024,2048], "
                     "or null (the run's context_length)")
    for v in value:
        if not _int(v) or v < 1:
            raise _error(f"task.context_lengths has {v!r}; each must be a positive integer (tokens), e.g. [1024,2048]")
    if len(set(value)) != len(value):
        raise _error(f"task.context_lengths={list(value)} repeats a length; give each once")
    return list(value)


class ReciteTask(LengthFittedTask):
    """Recite a ``digits``-digit number from a RULER niah_single haystack (module docstring)."""

    suite = "longgen"
    short_name = "recite"
    n_min = 1

    def __init__(self, data_dir: str | None = None, digits: object = 256, chunk: object = DEFAULT_CHUNK,
                 unique_ngram: object = 3, repeat_gap: object = 2, haystack: object = "noise", depth: object = None,
                 metric: object = DEFAULT_METRIC, context_lengths: object = None, **params: Any):
        if params:
            raise _error(f"unknown parameter(s) {', '.join(sorted(params))}; allowed: {', '.join(PARAMS)}")
        if not _int(digits) or not 16 <= digits <= 4096:
            raise _error(f"task.digits={digits!r} must be an integer within 16..4096 (digits of the number to recite)")
        if not _int(chunk) or not 1 <= chunk <= digits:
            raise _error(f"task.chunk={chunk!r} must be an integer within 1..{digits} (task.digits): digits per "
                         "scored chunk")
        if not _int(unique_ngram) or not (unique_ngram == 0 or 2 <= unique_ngram <= 8):
            raise _error(f"task.unique_ngram={unique_ngram!r} must be 0 (no rule) or an integer within 2..8: no "
                         "run of that many digits occurs twice in the number")
        if not _int(repeat_gap) or not 0 <= repeat_gap <= 5:
            raise _error(f"task.repeat_gap={repeat_gap!r} must be an integer within 0..5: each digit differs from "
                         "the ones that many places before it")
        if unique_ngram:
            room = allowed_ngrams(unique_ngram, repeat_gap)
            if digits - unique_ngram + 1 > room // 2:  # the walk needs slack to finish without dead ends
                raise _error(f"task.digits={digits} needs {digits - unique_ngram + 1} different {unique_ngram}-grams, "
                             f"more than half of the {room} that repeat_gap={repeat_gap} allows; use at most "
                             f"{room // 2 + unique_ngram - 1} digits, or a longer unique_ngram")
        if haystack not in HAYSTACKS:
            raise _error(f"task.haystack={haystack!r} is not known; allowed: {', '.join(HAYSTACKS)} (noise: RULER's "
                         "repeated noise sentence; essay: Paul Graham essays or the shipped fallback prose)")
        if depth is not None:
            if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 100:
                raise _error(f"task.depth={depth!r} must be a percent within 0..100, or null (a random depth per "
                             "sample)")
        self.digits, self.chunk, self.unique_ngram, self.repeat_gap = digits, chunk, unique_ngram, repeat_gap
        self.haystack = haystack
        self.depth = None if depth is None else float(depth)
        self.metric = check_metric(metric)
        self.context_lengths = check_lengths(context_lengths)
        self.reads_data = haystack == "essay"  # noise needs no files: a data_dir would be ignored
        self.info = {"suite": self.suite, "category": "long generation", "metric": self.metric}
        super().__init__(data_dir=data_dir)
        self._answer_tokens: dict[tuple, int] = {}

    def lengths(self, context_length: int) -> list[int]:
        return self.context_lengths if self.context_lengths is not None else [int(context_length)]

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int, seed: int) -> list[Sample]:
        """``n_samples`` samples per length of ``lengths`` (lengths outer); sample ``i`` has the same number and key
        at every length."""
        return [self.sample(encoder, length, seed, i) for length in self.lengths(context_length)
                for i in range(n_samples)]

    def sample(self, encoder: PromptEncoder, context_length: int, seed: int, index: int) -> Sample:
        s = super().sample(encoder, context_length, seed, index)
        s.meta["tokens_to_generate"] = s.max_new_tokens  # the base records the class's budget; ours is per tokenizer
        return s

    # -- one sample ---------------------------------------------------------------------------------------------
    def draw(self, key: tuple) -> tuple[str, str, float]:
        """(needle key, number, depth fraction) of random stream ``key``: independent of the haystack size, so
        fitting the length never changes what is recited."""
        rng = rng_for(NAME, *key)
        needle_key = random_word_key(rng)
        number = digit_string(rng, self.digits, self.unique_ngram, self.repeat_gap)
        depth = rng.random() if self.depth is None else self.depth / 100
        return needle_key, number, depth

    def answer_tokens(self, encoder: PromptEncoder, number: str) -> int:
        """Tokens of the answer as the model continues the prompt (`` <digits>.``): per tokenizer and digit count
        (a tokenizer that merges digit runs may vary slightly from number to number; the first one sets it)."""
        tok = encoder.tokenizer
        k = (type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok))
        if k not in self._answer_tokens:
            self._answer_tokens[k] = len(tok(f" {number}.", add_special_tokens=False).input_ids)
        return self._answer_tokens[k]

    def units(self, key: tuple, n: int) -> list[str]:
        """The ``n`` haystack units: noise lines, or consecutive essay sentences from a drawn start."""
        if self.haystack == "noise":
            return [NOISE] * n
        corpus = load_essays(self.data_dir)
        start = rng_for(NAME, "essay-start", *key).randrange(len(corpus.sentences))
        return [corpus.sentences[(start + i) % len(corpus.sentences)] for i in range(n)]

    def build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int) -> Sample:
        needle_key, number, depth = self.draw(key)
        units = self.units(key, n)
        at = round(depth * n)
        needle = needle_sentence("numbers", needle_key, number)
        start = needle.index(number)
        sep = "\n" if self.haystack == "noise" else " "  # niah.py: noise lines, essay sentences
        body = TextBuilder()
        for i, unit in enumerate(units[:at] + [None] + units[at:]):
            if i:
                body.add(sep)
            if unit is None:
                body.add(needle, ("evidence", start, start + len(number)))
            else:
                body.add(unit)
        head, question, prefix = niah_prompt("numbers", [needle_key], singular=True)
        meta = {"haystack": self.haystack, "depth": round(100 * at / n) if n else 0, "digits": self.digits,
                "key": needle_key, "answer_tokens": self.answer_tokens(encoder, number)}
        return make_sample(head, body, question, prefix, [number], meta["answer_tokens"] + MARGIN, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return recite_score(prediction, sample.answers[0], self.metric, self.chunk)

    def stop_strings(self) -> list[str]:
        """The needle ends with a period, so the answer does; a newline ends it too (the noise lines' end)."""
        return [".", "\n"]


__all__ = ["ReciteTask", "digit_string", "allowed_ngrams", "check_lengths", "NAME", "HAYSTACKS", "MARGIN"]
