"""Shared machinery of the RULER generators: seeded randomness, word lists, essays, length fitting, base task.

Seeds: every sample is a pure function of (task name, seed, index, tokenizer, context_length, length_rule). Its
random draws come from ``random.Random`` seeded with a SHA-256 digest of those values (never Python's salted
``hash``), so evaluation (seeds < 1000) and training (seeds >= 1_000_000) streams never collide and any
single sample can be regenerated alone with ``task.sample(encoder, context_length, seed, index)``.

Length (task parameter ``length_rule``; docs/ruler.md has the whole comparison with NVIDIA/RULER):

``ruler`` (default): official RULER's rule (scripts/data/synthetic/*.py, ``generate_samples`` and its
siblings). The budget is prompt + generation: ``tokens(prompt) + tokens_to_generate <= context_length``. One
search per (tokenizer, length) on a calibration sample picks the haystack size: a binary search over
``[incremental, max(estimate, 2 * incremental)]`` (``ruler_search``), ``incremental`` being the task's
step (essay: 500 words; noise/needle lines: 25, or 5 below 4096; documents, list words, vt lines: 10; vt
below 4096: 5). Each sample starts from that size and, while it overflows, steps down by ``incremental``
(never below it: RULER retries forever there). fwe has its own search (a linear one, as
freq_words_extraction.py). Where the official generator would produce nothing (its smallest size overflows),
the sample is fitted below the official range instead and ``meta["length_fallback"]`` says so.

``kvbench``: the rule of the first kvbench releases, the fill rule of ``tasks.base.LengthFittedTask`` (the generic
base of every task fitted to a token length, which ``RulerTask`` subclasses with RULER's own rule). The budget is the prompt alone (``context_length``; the
generation comes on top). The search runs once per (tokenizer, length) on a calibration sample (a bracketed
binary search steered by linear interpolation: a few full encodes instead of ~20); each sample then starts
from that size and is searched again (largest size that fits) only if it does not land within [0.95, 1.0] x
``context_length``. Prompts then fill at least 0.9 x ``context_length`` whenever one haystack unit is under a
tenth of the budget (too short budgets raise a one-line KvbenchError).

Every sample records ``meta["length_rule"]`` (the rule asked for) and ``meta["length_fallback"]`` (None, or
how a ``ruler`` sample was fitted where the official generator has no size that fits).
"""
from __future__ import annotations

import bisect
import hashlib
import logging
import math
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from harness.errors import KvbenchError
from harness.paths import read_json_object, read_text
from tasks.base import (ACCEPT_HINT, CALIBRATION, LengthFittedTask, PromptEncoder, Sample, TooShort,  # noqa: F401
                        fit_length)
from tasks.ruler.metrics import postprocess_pred, string_match_all, string_match_part

DATA = Path(__file__).parent / "data"
MIN_FILL = 0.9  # kvbench rule: a prompt must use at least this fraction of context_length
LENGTH_RULES = ("ruler", "kvbench")  # task parameter length_rule: official RULER's rule, or kvbench's fill rule
RULER_SEED = 42  # prepare.py's --random_seed default: the fixed-seed draws of the calibration sample
# meta["length_fallback"] of a length_rule=ruler sample the official generator cannot make (its smallest size
# overflows prompt + generation; RULER's sample loop then retries forever): fitted below the official range
BELOW_RANGE = "below official range"  # prompt + generation <= context_length still holds
BELOW_RANGE_PROMPT_ONLY = "below official range, prompt only"  # not even that fits: prompt <= context_length
log = logging.getLogger("kvbench")


# ----------------------------------------------------------------------------------------------- randomness
def derive_seed(*parts: Any) -> int:
    """A 64-bit integer from any printable parts, stable across processes and Python versions."""
    text = "\x1f".join(str(p) for p in ("kvbench-ruler", *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def rng_for(*parts: Any) -> random.Random:
    return random.Random(derive_seed(*parts))


# ----------------------------------------------------------------------------------------------- word lists
@lru_cache(maxsize=None)
def word_list(kind: str) -> tuple[str, ...]:
    """wonderwords 3.0.1 assets (MIT, shipped in data/): 'nouns', 'adjectives', 'verbs'."""
    path = DATA / f"{kind}.txt"
    return tuple(w.rstrip() for w in path.read_text(encoding="utf-8").splitlines())


@lru_cache(maxsize=None)
def common_words() -> tuple[str, ...]:
    """RULER's cwe vocabulary: sorted(set(nouns + adjectives + verbs)) (common_words_extraction.py)."""
    return tuple(sorted(set(word_list("nouns") + word_list("adjectives") + word_list("verbs"))))


def random_word_key(rng: random.Random) -> str:
    """A needle key 'adjective-noun' (niah.py draws uniformly from all adjective-noun pairs)."""
    return f"{rng.choice(word_list('adjectives'))}-{rng.choice(word_list('nouns'))}"


def random_number(rng: random.Random, num_digits: int = 7) -> str:
    return str(rng.randint(10 ** (num_digits - 1), 10 ** num_digits - 1))


def random_uuid(rng: random.Random) -> str:
    """niah.py: uuid.UUID(int=getrandbits(128), version=4), from the seeded generator."""
    import uuid

    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_needle(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_word_key(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise KvbenchError(f"needle type {kind!r} is not known; allowed: numbers, words, uuids")


# ----------------------------------------------------------------------------------------------- essays
_SENT_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """A small stand-in for nltk's sent_tokenize: break after . ! ? (and closing quotes) before a capital."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        end = m.end()
        out.append(text[start:end].rstrip())
        start = end
    if start < len(text):
        out.append(text[start:].strip())
    return [s for s in out if s]


class EssayCorpus:
    """Whitespace-normalized essay text as sentences, to take RULER's ``" ".join(words[:n])`` quickly."""

    def __init__(self, text: str, source: str, fallback: bool):
        text = re.sub(r"\s+", " ", text).strip()
        if not text:  # sentences_for could never take a word from it (it looped forever)
            raise KvbenchError(f"{source}: the essays hold no words, a haystack needs text; {ESSAY_HINT}")
        self.source = source
        self.fallback = fallback
        self.sentences = split_sentences(text)
        self.word_counts = [s.count(" ") + 1 for s in self.sentences]
        self.cum = [0]
        for c in self.word_counts:
            self.cum.append(self.cum[-1] + c)
        self.n_words = self.cum[-1]

    def sentences_for(self, n_words: int) -> list[str]:
        """Sentences of the first ``n_words`` words (the corpus repeats when it is too short, as RULER's)."""
        out: list[str] = []
        remaining = n_words
        while remaining > 0:
            k = bisect.bisect_right(self.cum, remaining) - 1  # whole sentences that fit
            k = min(k, len(self.sentences))
            out.extend(self.sentences[:k])
            remaining -= self.cum[k]
            if remaining and k < len(self.sentences):
                out.append(" ".join(self.sentences[k].split(" ")[:remaining]))
                remaining = 0
        return out


ESSAY_FILE, ESSAY_DIR = "PaulGrahamEssays.json", "PaulGrahamEssays"
ESSAY_HINT = (f"RULER's {ESSAY_FILE} is {{\"text\": \"<all essays>\"}}, as its scripts/data/synthetic/json/"
              "download_paulgraham_essay.py writes it")
_ESSAY_CACHE: dict[tuple, EssayCorpus] = {}


def essay_source(data_dir: str | None) -> Path | None:
    """The essay file (or folder of .txt essays) in ``data_dir``; None without a data_dir (the shipped fallback).
    A data_dir without essays is an error: the user meant them to be read, the fallback would pass silently."""
    if not data_dir:
        return None
    root = Path(data_dir).expanduser()
    if (root / ESSAY_FILE).is_file():
        return root / ESSAY_FILE
    if (root / ESSAY_DIR).is_dir():
        if not any((root / ESSAY_DIR).glob("*.txt")):
            raise KvbenchError(f"{root / ESSAY_DIR} holds no .txt essays; put the essays there as .txt files")
        return root / ESSAY_DIR
    raise KvbenchError(f"task.data_dir={str(data_dir)!r} has no {ESSAY_FILE} (nor a {ESSAY_DIR}/ folder of .txt "
                       "essays): put the essays there, or drop task.data_dir for the shipped fallback haystack; "
                       f"{ESSAY_HINT}")


def read_essays(path: Path) -> str:
    """The essay text of a ``PaulGrahamEssays.json`` or of a folder of .txt essays (file-name order)."""
    if path.is_dir():
        return "".join(read_text(p) for p in sorted(path.glob("*.txt")))
    data = read_json_object(path, ESSAY_HINT)
    if not isinstance(data.get("text"), str):
        raise KvbenchError(f"{path}: no \"text\" string (keys: {', '.join(map(repr, data)) or 'none'}); {ESSAY_HINT}")
    return data["text"]


def load_essays(data_dir: str | None) -> EssayCorpus:
    """Paul Graham essays from ``data_dir``, else the offline fallback prose in data/.

    Accepted in ``data_dir`` (first found wins):
      - ``PaulGrahamEssays.json``: RULER's file, ``{"text": "<all essays concatenated>"}``
        (scripts/data/synthetic/json/download_paulgraham_essay.py writes it);
      - ``PaulGrahamEssays/*.txt``: one essay per file, concatenated in file-name order.
    """
    path = essay_source(data_dir)
    key = (str(path), path.stat().st_mtime_ns) if path else ("<fallback>", 0)
    if key not in _ESSAY_CACHE:
        if path is None:
            text = (DATA / "fallback_essays.txt").read_text(encoding="utf-8")
        else:
            text = read_essays(path)
        _ESSAY_CACHE[key] = EssayCorpus(text, key[0], fallback=path is None)
    return _ESSAY_CACHE[key]


# ----------------------------------------------------------------------------------------------- building
class TextBuilder:
    """Concatenates pieces and remembers the character span of the pieces it is told to mark."""

    def __init__(self):
        self.parts: list[str] = []
        self.length = 0
        self.spans: dict[str, list[list[int]]] = {}

    def add(self, text: str, *marks: str | tuple[str, int, int]) -> None:
        """Append ``text``; each mark ``tag`` records its span, ``(tag, b, e)`` the sub-span ``text[b:e]``."""
        for m in marks:
            tag, b, e = (m, 0, len(text)) if isinstance(m, str) else m
            self.spans.setdefault(tag, []).append([self.length + b, self.length + e])
        self.parts.append(text)
        self.length += len(text)

    def text(self) -> str:
        return "".join(self.parts)


def ruler_search(count: Callable[[int], int], max_seq_length: int, tokens_to_generate: int, incremental: int,
                 upper: int) -> int | None:
    """Official RULER's haystack search (niah.py ``generate_samples``, qa.py ``generate_samples``,
    variable_tracking.py ``sys_vartrack_w_noise_random``, common_words_extraction.py ``sys_word_pair_random``).

    A binary search over ``[incremental, upper]`` for a size whose prompt tokens ``count(n)`` plus
    ``tokens_to_generate`` fit ``max_seq_length``: the largest such size when ``count`` is increasing, and
    otherwise the same size RULER's probes would settle on (the probes are RULER's: ``mid = (lo + hi) // 2``).
    None when no probe fits (RULER then starts every sample at ``incremental``).
    """
    lower, best = incremental, None
    while lower <= upper:
        mid = (lower + upper) // 2
        if count(mid) + tokens_to_generate <= max_seq_length:
            best, lower = mid, mid + 1
        else:
            upper = mid - 1
    return best


def ruler_upper(probe_tokens: int, probe: int, max_seq_length: int, incremental: int) -> int:
    """The binary search's upper bound from a probe of ``probe`` units with ``probe_tokens`` prompt tokens:
    ``max(int((max_seq_length / tokens_per_unit) * 3), 2 * incremental)`` (niah.py, qa.py, variable_tracking.py)."""
    return max(int((max_seq_length / (probe_tokens / probe)) * 3), incremental * 2)


# ----------------------------------------------------------------------------------------------- base task
class RulerTask(LengthFittedTask):
    """One RULER task (``ruler/<ruler_name>``): a ``LengthFittedTask`` with official RULER's length rule
    (``fit_ruler``, ``length_rule=ruler``) besides kvbench's fill rule, RULER's metric and no stop strings.
    ``sample(encoder, context_length, seed, index)`` builds one prompt (pure function)."""

    suite = "ruler"
    ruler_name: str = ""
    metric: str = "string_match_all"
    category: str = ""
    haystack: str = ""

    def __init__(self, data_dir: str | None = None, depth: float | None = None, length_rule: str = "ruler",
                 **params: Any):
        super().__init__(data_dir=data_dir, **params)
        if params:
            raise KvbenchError(f"{self.name}: unknown parameter(s) {', '.join(sorted(params))}; allowed: data_dir, "
                               "depth, length_rule")
        if length_rule not in LENGTH_RULES:
            raise KvbenchError(f"{self.name}: length_rule={length_rule!r} is not known; allowed: "
                               f"{', '.join(LENGTH_RULES)} (ruler: official RULER's, prompt + generation <= "
                               "context_length; kvbench: the prompt fills 90-100% of context_length)")
        if depth is not None:
            if not self.supports_depth:
                raise KvbenchError(f"{self.name}: depth is only for the niah tasks; use depth=null")
            depth = float(depth)
            if not 0 <= depth <= 100:
                raise KvbenchError(f"{self.name}: depth={depth} must be within 0..100 (percent) or null")
            if depth.is_integer():
                depth = int(depth)
        self.depth = depth
        self.length_rule = length_rule
        self.info = {"suite": self.suite, "category": self.category, "metric": self.metric}

    supports_depth = False

    @property
    def short_name(self) -> str:  # type: ignore[override]
        return self.ruler_name

    @property
    def official(self) -> bool:
        """Whether the official RULER length rule applies (``length_rule=ruler``)."""
        return self.length_rule == "ruler"

    def ruler_incremental(self, context_length: int) -> int:
        """Official RULER's ``incremental``: the binary search's smallest size and the per-sample step down."""
        raise NotImplementedError

    def fit(self, encoder: PromptEncoder, context_length: int, key: tuple) -> tuple[Sample, int, int, str | None]:
        """``length_rule=ruler``: official RULER's rule (``fit_ruler``); ``kvbench``: the base's fill rule."""
        if self.official:
            return self.fit_ruler(encoder, context_length, key)
        return super().fit(encoder, context_length, key)

    # -- length_rule=ruler ------------------------------------------------------------------------------
    def ruler_upper(self, encoder: PromptEncoder, context_length: int, incremental: int) -> int:
        """The binary search's upper bound: a probe of ``incremental`` units (niah.py, qa.py)."""
        return ruler_upper(self.calibration_count(encoder, context_length)(incremental), incremental,
                           context_length, incremental)

    def ruler_start(self, encoder: PromptEncoder, context_length: int) -> int | None:
        """The size every sample starts from: ``ruler_search`` on the calibration sample, or ``incremental``
        when nothing fits (as RULER). None: no official size to start from."""
        k = ("ruler", *self._encoder_key(encoder, context_length))
        if k not in self._hints:
            inc = self.ruler_incremental(context_length)
            best = ruler_search(self.calibration_count(encoder, context_length), context_length, self.max_new_tokens,
                                inc, self.ruler_upper(encoder, context_length, inc))
            self._hints[k] = inc if best is None else best
        return self._hints[k]

    def ruler_down(self, used: int, incremental: int) -> int | None:
        """The size RULER retries an overflowing sample with (``used -= incremental`` while ``used > incremental``);
        None where RULER would retry the same size forever."""
        return used - incremental if used > incremental else None

    def fit_ruler(self, encoder: PromptEncoder, context_length: int, key: tuple
                  ) -> tuple[Sample, int, int, str | None]:
        """Official RULER's rule: (sample, size, prompt tokens, fallback). The sample starts at ``ruler_start``
        and steps down by ``incremental`` while prompt + generation overflows ``context_length``."""
        inc = self.ruler_incremental(context_length)
        used = self.ruler_start(encoder, context_length)
        while used is not None:
            s = self.build(encoder, context_length, key, used)
            t = self.count(encoder, s)
            if t + self.max_new_tokens <= context_length:
                return s, used, t, None
            used = self.ruler_down(used, inc)
        warned = ("warned", *self._encoder_key(encoder, context_length))
        fallback = BELOW_RANGE
        try:
            fit = self.fit_fill(encoder, context_length, key, context_length - self.max_new_tokens)
        except TooShort:
            fit, fallback = self.fit_fill(encoder, context_length, key, context_length), BELOW_RANGE_PROMPT_ONLY
        if warned not in self._hints:
            self._hints[warned] = True
            log.warning("%s: at context_length=%d the official RULER generator has no haystack size that fits "
                        "(it would retry forever); samples fitted %s (meta length_fallback)", self.name,
                        context_length, fallback)
        return (*fit, fallback)

    def score(self, prediction: str, sample: Sample) -> float:
        pred = postprocess_pred(prediction)
        if self.metric == "string_match_part":
            return string_match_part(pred, sample.answers)
        return string_match_all(pred, sample.answers)

    def stop_strings(self) -> list[str]:
        return []  # RULER generates without stop words (scripts/config_tasks.sh: STOP_WORDS="")


def make_sample(head: str, body: TextBuilder, question: str, answer_prefix: str, answers: list[str],
                max_new_tokens: int, meta: dict) -> Sample:
    """Assemble context = head + body; evidence spans are shifted by ``len(head)``."""
    shift = len(head)
    spans = {k: [[b + shift, e + shift] for b, e in v] for k, v in body.spans.items()}
    meta = dict(meta)
    meta["evidence"] = spans.get("evidence", [])
    for k, v in spans.items():
        if k != "evidence":
            meta[k] = v
    return Sample(sample_id="", context=head + body.text(), question=question, answers=list(answers),
                  answer_prefix=answer_prefix, max_new_tokens=max_new_tokens, meta=meta)


def depth_percent(pos: int, total: int) -> int:
    return int(round(100 * pos / total)) if total else 0


def zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta for s > 1 (scipy.special.zeta in freq_words_extraction.py), Euler-Maclaurin tail."""
    total = math.fsum(k ** -s for k in range(1, terms))
    n = float(terms)
    return total + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12
