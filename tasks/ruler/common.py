"""Shared machinery of the RULER generators: seeded randomness, word lists, essays, length fitting, base task.

Seeds: every sample is a pure function of (task name, seed, index, tokenizer, context_length). Its random
draws come from ``random.Random`` seeded with a SHA-256 digest of those values (never Python's salted
``hash``), so evaluation (seeds < 1000) and training (seeds >= 1_000_000) streams never collide and any
single sample can be regenerated alone with ``task.sample(encoder, context_length, seed, index)``.

Length: like RULER, the haystack size (noise sentences, essay words, distractor needles, list words,
documents) is searched so that the whole prompt, counted by the harness's own ``PromptEncoder``, fits the
budget. Unlike RULER the budget is the prompt alone (``context_length``; the generation budget comes on
top). The search runs once per (tokenizer, length) on a calibration sample (a bracketed binary search
steered by linear interpolation: a few full encodes instead of ~20); each sample then starts from that
size and is searched again (largest size that fits) only if it does not land within [0.95, 1.0] x
``context_length``. Prompts then fill at least 0.9 x ``context_length`` whenever one haystack unit is
under a tenth of the budget (too short budgets raise a one-line KvbenchError).
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from harness.errors import KvbenchError
from harness.paths import read_json_object, read_text
from tasks.base import PromptEncoder, Sample, Task
from tasks.ruler.metrics import postprocess_pred, string_match_all, string_match_part

DATA = Path(__file__).parent / "data"
MIN_FILL = 0.9  # a prompt must use at least this fraction of context_length
ACCEPT_HINT = 0.95  # a sample keeps the calibrated haystack size if it fills at least this much


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


def fit_length(measure: Callable[[int], int], limit: int, n_min: int, n_start: int,
               known: dict[int, int] | None = None, max_probes: int = 48,
               good: float = 0.99) -> tuple[int | None, int]:
    """Largest ``n >= n_min`` with ``measure(n) <= limit`` (RULER's binary search on the haystack size).

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


# ----------------------------------------------------------------------------------------------- base task
class RulerTask(Task):
    """One RULER task. ``sample(encoder, context_length, seed, index)`` builds one prompt (pure function)."""

    ruler_name: str = ""
    metric: str = "string_match_all"
    max_new_tokens: int = 32
    category: str = ""
    haystack: str = ""
    n_min: int = 1  # smallest haystack size

    def __init__(self, data_dir: str | None = None, depth: float | None = None, **params: Any):
        super().__init__(data_dir=data_dir, **params)
        if params:
            raise KvbenchError(f"{self.name}: unknown parameter(s) {', '.join(sorted(params))}; allowed: data_dir, depth")
        if depth is not None:
            if not self.supports_depth:
                raise KvbenchError(f"{self.name}: depth is only for the niah tasks; use depth=null")
            depth = float(depth)
            if not 0 <= depth <= 100:
                raise KvbenchError(f"{self.name}: depth={depth} must be within 0..100 (percent) or null")
            if depth.is_integer():
                depth = int(depth)
        self.depth = depth
        self.info = {"suite": "ruler", "category": self.category, "metric": self.metric}
        self._hints: dict[tuple, int] = {}

    supports_depth = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"ruler/{self.ruler_name}"

    # -- to implement ---------------------------------------------------------------------------------
    def build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int) -> Sample:
        """The sample of random stream ``key`` with haystack size ``n`` (fields filled except sample_id)."""
        raise NotImplementedError

    def sample_key(self, seed: int, index: int) -> tuple:
        return (self.ruler_name, seed, index)

    # -- generic ----------------------------------------------------------------------------------------
    def _encoder_key(self, encoder: PromptEncoder, context_length: int) -> tuple:
        tok = encoder.tokenizer
        return (type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok), encoder.chat,
                encoder.system_prompt, context_length)

    @staticmethod
    def count(encoder: PromptEncoder, s: Sample) -> int:
        return encoder.count(s.context, s.question + s.answer_prefix)

    def _too_short(self, context_length: int, tokens: int) -> KvbenchError:
        return KvbenchError(f"{self.name}: context_length={context_length} is too short; its smallest prompt "
                            f"has {tokens} tokens")

    def size_hint(self, encoder: PromptEncoder, context_length: int) -> int:
        """The largest haystack size of the calibration sample (RULER's one binary search per dataset)."""
        k = self._encoder_key(encoder, context_length)
        if k not in self._hints:
            key = ("calibration", self.ruler_name)
            n, t = fit_length(lambda n: self.count(encoder, self.build(encoder, context_length, key, n)),
                              context_length, self.n_min, self.n_min)
            if n is None:
                raise self._too_short(context_length, t)
            self._hints[k] = n
        return self._hints[k]

    def sample(self, encoder: PromptEncoder, context_length: int, seed: int, index: int) -> Sample:
        key = self.sample_key(seed, index)
        n = self.size_hint(encoder, context_length)
        built: dict[int, Sample] = {}

        def measure(m: int) -> int:
            built[m] = self.build(encoder, context_length, key, m)
            return self.count(encoder, built[m])

        t = measure(n)
        if not (ACCEPT_HINT * context_length <= t <= context_length):
            n, t = fit_length(measure, context_length, self.n_min, n, known={n: t})
            if n is None:
                raise self._too_short(context_length, t)
        s = built[n]
        s.sample_id = f"{self.name}/L{context_length}/s{seed}/{index}"
        s.meta.update({"seed": seed, "index": index, "n_haystack": n, "prompt_tokens": t,
                       "context_length": context_length})
        return s

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int, seed: int) -> list[Sample]:
        return [self.sample(encoder, context_length, seed, i) for i in range(n_samples)]

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
