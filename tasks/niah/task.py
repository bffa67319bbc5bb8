"""The ``niah`` task: gkamradt's haystack construction on a length x depth grid, kvpress's prompt layout and score.

Sources: gkamradt/LLMTest_NeedleInAHaystack commit 7b90d285651b68d39a94f3d3bd3672f84192c989
(needlehaystack/llm_needle_haystack_tester.py, run.py, providers/openai.py) and NVIDIA/kvpress commit
8bb29b9c3078452a86d692f29123fa6c793e2b05 (evaluation/benchmarks/needle_in_haystack/, kvpress/pipeline.py).
docs/niah.md has the whole construction and every difference from both.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from harness.errors import KvbenchError
from tasks.base import PromptEncoder, Sample, Task
from tasks.niah.metric import DEFAULT_METRIC, check_metric, niah_score
from tasks.ruler.common import EssayCorpus, load_essays, rng_for

NAME = "niah"
# gkamradt's run.py defaults (CommandArgs): the needle (with its newlines) and the retrieval question.
NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
# The user turn of gkamradt's default provider (providers/openai.py generate_prompt): the question, then this.
QUESTION_INSTRUCTION = " Don't give information outside the document or repeat your findings"
# kvpress's insert_needle_in_haystack default context_wrapper (evaluation/benchmarks/needle_in_haystack/utils.py).
CONTEXT_WRAPPER = "This is a very long story book: <book> {context} </book>."
BUFFER = 200  # gkamradt's final_context_length_buffer (tester and run.py default): system, question, response
MAX_NEW_TOKENS = 50  # kvpress's pipeline default (kvpress/pipeline.py __call__); its dataset's own is not offline
# gkamradt's default depth grid: np.round(np.linspace(0, 100, num=35)).astype(int) (document_depth_percent_min 0,
# _max 100, _intervals 35, linear); the 35 values are exact (no .5 to round: 100 k / 34 is never a half).
DEPTHS = tuple(int(round(100 * k / 34)) for k in range(35))
PARAMS = ("data_dir", "context_lengths", "depths", "needle", "question", "answer_prefix", "max_new_tokens",
          "final_context_length_buffer", "context_wrapper", "metric")


def _error(text: str) -> KvbenchError:
    return KvbenchError(f"{NAME}: {text}")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_lengths(value: object) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise _error(f"task.context_lengths={value!r} must be a non-empty list of token lengths, e.g. [1024,4096], "
                     "or null (the run's context_length)")
    for v in value:
        if not _int(v) or v < 1:
            raise _error(f"task.context_lengths has {v!r}; each must be a positive integer (tokens), e.g. [1024,4096]")
    if len(set(value)) != len(value):
        raise _error(f"task.context_lengths={list(value)} repeats a length; give each once")
    return list(value)


def check_depths(value: object) -> list[int | float]:
    if value is None:
        return list(DEPTHS)
    if not isinstance(value, (list, tuple)) or not value:
        raise _error(f"task.depths={value!r} must be a non-empty list of percents in 0..100, e.g. [0,25,50,75,100], "
                     "or null (gkamradt's 35-point grid)")
    out: list[int | float] = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 100:
            raise _error(f"task.depths has {v!r}; each must be a percent within 0..100, e.g. [0,25,50,75,100]")
        out.append(int(v) if float(v).is_integer() else float(v))
    if len(set(out)) != len(out):
        raise _error(f"task.depths={out} repeats a depth; give each once")
    return out


def _text(key: str, value: object, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        kind = "a string" if empty_ok else "a non-empty string"
        raise _error(f"task.{key}={value!r} must be {kind}")
    return value


def _count(key: str, value: object, minimum: int) -> int:
    if not _int(value) or value < minimum:
        raise _error(f"task.{key}={value!r} must be an integer >= {minimum}")
    return value


# ------------------------------------------------------------------------------------------------ haystack text
@lru_cache(maxsize=4)
def _corpus_text(corpus: EssayCorpus) -> tuple[str, tuple[int, ...]]:
    """The corpus as one string (its sentences joined by spaces: the whitespace-normalized essays) and the
    character offset of every sentence."""
    starts, at = [], 0
    for s in corpus.sentences:
        starts.append(at)
        at += len(s) + 1
    return " ".join(corpus.sentences), tuple(starts)


def haystack_text(corpus: EssayCorpus, start: int, n_chars: int) -> str:
    """At least ``n_chars`` characters of the corpus from character ``start``, the corpus repeating after its end
    (gkamradt's read_context_files concatenates the essays again until the longest length is reached)."""
    text, _ = _corpus_text(corpus)
    out = text[start:]
    while len(out) < n_chars:
        out += " " + text
    return out[:max(n_chars, 1)]


class NiahTask(Task):
    """Needle in a Haystack: for each context length x depth, ``n_samples`` samples (see docs/niah.md)."""

    name = NAME
    reads_data = True  # Paul Graham essays (the shipped fallback prose without a data_dir)
    info = {"suite": NAME, "category": "retrieval", "metric": DEFAULT_METRIC}

    def __init__(self, data_dir: str | None = None, context_lengths: object = None, depths: object = None,
                 needle: object = NEEDLE, question: object = QUESTION, answer_prefix: object = "",
                 max_new_tokens: object = MAX_NEW_TOKENS, final_context_length_buffer: object = BUFFER,
                 context_wrapper: object = CONTEXT_WRAPPER, metric: object = DEFAULT_METRIC, **params: Any):
        if params:
            raise _error(f"unknown parameter(s) {', '.join(sorted(params))}; allowed: {', '.join(PARAMS)}")
        self.context_lengths = check_lengths(context_lengths)
        self.depths = check_depths(depths)
        self.needle = _text("needle", needle)
        self.question = _text("question", question)
        self.answer_prefix = _text("answer_prefix", answer_prefix, empty_ok=True)
        self.max_new_tokens = _count("max_new_tokens", max_new_tokens, 1)
        self.buffer = _count("final_context_length_buffer", final_context_length_buffer, 0)
        wrapper = _text("context_wrapper", context_wrapper)
        if wrapper.count("{context}") != 1:
            raise _error(f"task.context_wrapper={wrapper!r} must hold {{context}} exactly once (where the haystack "
                         f"goes), e.g. {CONTEXT_WRAPPER!r}")
        self.wrap_head, self.wrap_tail = wrapper.split("{context}")
        self.metric = check_metric(metric)
        self.info = {**self.info, "metric": self.metric}
        super().__init__(data_dir=data_dir)
        self._haystacks: dict[tuple, list[int]] = {}
        self._periods: dict[tuple, dict[int, bool]] = {}

    # -- the grid ---------------------------------------------------------------------------------------------
    def lengths(self, context_length: int) -> list[int]:
        """The grid's lengths: ``task.context_lengths``, else the run's ``context_length``."""
        return self.context_lengths if self.context_lengths is not None else [int(context_length)]

    def cells(self, context_length: int) -> list[tuple[int, int | float]]:
        """The (length, depth) cells, in sample order; ``samples`` makes ``n_samples`` of each."""
        return [(length, depth) for length in self.lengths(context_length) for depth in self.depths]

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int, seed: int) -> list[Sample]:
        """``n_samples`` samples per (length, depth) cell, lengths outer, depths inner: ``len(lengths) x
        len(depths) x n_samples`` in all. Sample ``i`` of every cell has the same haystack start (index 0 the
        essays' beginning, as gkamradt's; i > 0 a sentence drawn from (seed, i))."""
        corpus = load_essays(self.data_dir)
        return [self.sample(encoder, corpus, length, depth, seed, i)
                for length, depth in self.cells(context_length) for i in range(n_samples)]

    def haystack_start(self, corpus: EssayCorpus, seed: int, index: int) -> int:
        """Character offset where the haystack of sample ``index`` starts: 0 for index 0 (gkamradt's haystack, the
        essays from their start), else the start of a sentence drawn from (seed, index)."""
        if index == 0:
            return 0
        _, starts = _corpus_text(corpus)
        return starts[rng_for(NAME, "haystack", seed, index).randrange(len(starts))]

    # -- gkamradt's construction, in the model's tokens -----------------------------------------------------------
    def _encode(self, encoder: PromptEncoder, text: str) -> list[int]:
        return list(encoder.tokenizer(text, add_special_tokens=False).input_ids)  # tiktoken adds no special tokens

    def haystack_tokens(self, encoder: PromptEncoder, corpus: EssayCorpus, length: int, start: int,
                        n_needle: int) -> list[int]:
        """gkamradt's generate_context up to the needle: the essays encoded and cut to ``length`` tokens
        (encode_and_trim), decoded and encoded again (insert_needle re-encodes the text), then cut so that haystack
        + needle fill ``length - final_context_length_buffer`` tokens."""
        tok = encoder.tokenizer
        key = (type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok), corpus.source, length, start,
               n_needle, self.buffer)
        if key not in self._haystacks:
            budget = length - self.buffer - n_needle
            if budget < 1:
                raise _error(f"context length {length} is too short: the needle ({n_needle} tokens) and "
                             f"final_context_length_buffer={self.buffer} leave no haystack; use lengths above "
                             f"{self.buffer + n_needle}")
            n_chars = 5 * length + 64
            while True:  # enough text for ``length`` tokens, without encoding the whole corpus
                ids = self._encode(encoder, haystack_text(corpus, start, n_chars))
                if len(ids) >= length:
                    break
                n_chars *= 2
            ids = self._encode(encoder, tok.decode(ids[:length]))
            self._haystacks[key] = ids[:budget]  # insert_needle: cut when haystack + needle > length - buffer
        return self._haystacks[key]

    def is_period(self, encoder: PromptEncoder, token: int) -> bool:
        """A sentence end for insert_needle's back-up: one of the ids of ``encode('.')`` (gkamradt's
        period_tokens), or a token whose text is a period with a space marker (sentencepiece's "▁.")."""
        tok = encoder.tokenizer
        key = (type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok))
        if key not in self._periods:
            self._periods[key] = {t: True for t in self._encode(encoder, ".")}
        known = self._periods[key]
        if token not in known:
            known[token] = tok.decode([token]).strip() == "."
        return known[token]

    def insertion_point(self, encoder: PromptEncoder, haystack: list[int], depth: float) -> int:
        """insert_needle's position: the end at depth 100, else ``int(len * depth / 100)`` moved back until the
        token before it is a period (the haystack's start when none is)."""
        if depth == 100:
            return len(haystack)
        point = int(len(haystack) * (depth / 100))
        while point > 0 and not self.is_period(encoder, haystack[point - 1]):
            point -= 1
        return point

    def build(self, encoder: PromptEncoder, haystack: list[int], needle_ids: list[int], depth: float
              ) -> tuple[Sample, int]:
        """The sample with the needle inserted at ``depth`` (context, question, evidence), and the insertion
        point (tokens of the haystack before the needle)."""
        tok = encoder.tokenizer
        point = self.insertion_point(encoder, haystack, depth)
        text = tok.decode(haystack[:point] + needle_ids + haystack[point:])
        before = tok.decode(haystack[:point])
        target = tok.decode(needle_ids).strip()
        at = text.find(target, max(0, len(before) - len(target) // 2))
        if at < 0:
            raise _error(f"the tokenizer does not decode the needle back to its text ({target[:40]!r}...); evidence "
                         "cannot be placed")
        head = self.wrap_head
        context = head + text + self.wrap_tail
        # the question part: gkamradt's user turn on its own line; kvpress ends it with "\n" without a chat template
        question = "\n" + self.question + QUESTION_INSTRUCTION + ("" if encoder.chat else "\n")
        needle = self.needle.strip()
        sample = Sample(sample_id="", context=context, question=question, answers=[needle],
                        answer_prefix=self.answer_prefix, max_new_tokens=self.max_new_tokens,
                        meta={"evidence": [[len(head) + at, len(head) + at + len(target)]]})
        return sample, point

    def sample(self, encoder: PromptEncoder, corpus: EssayCorpus, length: int, depth: float, seed: int,
               index: int) -> Sample:
        """One sample of the cell (``length``, ``depth``). gkamradt's buffer covers the prompt's other parts; where
        it does not (a long chat template, a long question), the haystack is cut further until the prompt fits."""
        needle_ids = self._encode(encoder, self.needle)
        start = self.haystack_start(corpus, seed, index)
        haystack = self.haystack_tokens(encoder, corpus, length, start, len(needle_ids))
        official = len(haystack)
        while True:
            sample, point = self.build(encoder, haystack, needle_ids, depth)
            tokens = encoder.count_sample(sample)
            if tokens <= length:
                break
            if len(haystack) <= 1:
                raise _error(f"context length {length} is too short for the prompt around the haystack "
                             f"({tokens} tokens with one haystack token); use a longer length")
            haystack = haystack[:max(1, len(haystack) - (tokens - length))]
        positions = encoder.context_token_indices(sample.context, sample.meta["evidence"])
        sample.sample_id = f"{NAME}/L{length}/d{depth}/s{seed}/{index}"
        sample.meta.update({
            "depth": depth, "context_length": length, "needle_token_position": positions[0] if positions else None,
            "needle_tokens": len(needle_ids), "haystack_tokens": len(haystack), "haystack_cut": official - len(haystack),
            "insertion_token": point, "depth_effective": round(100 * point / len(haystack), 2),
            "haystack_start_char": start, "prompt_tokens": tokens, "seed": seed, "index": index,
            "fallback_haystack": corpus.fallback, "tokens_to_generate": self.max_new_tokens,
        })
        return sample

    def score(self, prediction: str, sample: Sample) -> float:
        return niah_score(sample.answers[0], prediction, self.metric)


__all__ = ["NiahTask", "NEEDLE", "QUESTION", "QUESTION_INSTRUCTION", "CONTEXT_WRAPPER", "BUFFER", "DEPTHS",
           "MAX_NEW_TOKENS", "haystack_text", "check_lengths", "check_depths"]
