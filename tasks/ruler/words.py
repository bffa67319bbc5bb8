"""Aggregation tasks: common words extraction (``cwe``) and frequent words extraction (``fwe``).

After NVIDIA/RULER scripts/data/synthetic/common_words_extraction.py and freq_words_extraction.py.

cwe: a numbered list ``1. word 2. word ...`` where 10 common words appear ``freq_cw`` times and the others
``freq_ucw`` times, shuffled; one solved example (40 words, 10x/3x) comes first. Below a 4096-token budget
RULER uses a 20-word example (3x/1x) and 6x/1x in the task (``meta["cwe_config"]``: small / large). The
haystack size is the number of distinct words. ``meta["evidence"]``: spans of every occurrence of the 10 common
words in the task's list.

fwe: coded text of random 6-letter words drawn with Zipf counts ``int(n * k**-alpha / zeta(alpha))`` for
rank k, the top word replaced by '...' (noise); the answer is ranks 2-4. Vocabulary size is
``(context_length - 50) // 50`` (RULER's, after the generation budget is taken off; ``length_rule=kvbench``:
``context_length // 50``). ``meta["evidence"]``: spans of every occurrence of the three answer words.
"""
from __future__ import annotations

import random
import string

from tasks.base import PromptEncoder, Sample
from tasks.ruler.common import (CALIBRATION, RulerTask, TextBuilder, common_words, make_sample, rng_for, word_list,
                                zeta)
from tasks.ruler.templates import CONFIGS, split_template


def draw_words(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct words from the wonderwords vocabulary; beyond its size, adjective-noun compounds too."""
    words = common_words()
    if k <= len(words):
        return rng.sample(words, k)
    adjs, nouns = word_list("adjectives"), word_list("nouns")
    idx = rng.sample(range(len(words) + len(adjs) * len(nouns)), k)
    return [words[i] if i < len(words) else
            f"{adjs[(i - len(words)) // len(nouns)]}-{nouns[(i - len(words)) % len(nouns)]}" for i in idx]


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


class CommonWordsTask(RulerTask):
    ruler_name = "cwe"
    category = "aggregation"
    metric = "string_match_all"
    haystack = "words"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        cfg = CONFIGS["cwe"]
        self.freq_cw, self.freq_ucw, self.num_cw = cfg["freq_cw"], cfg["freq_ucw"], cfg["num_cw"]
        self.max_new_tokens = 120  # constants.py: common_words_extraction tokens_to_generate
        self.n_min = self.num_cw

    def _example(self, rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int,
                 rng_rest: random.Random | None = None):
        """RULER's get_example. With ``rng_rest`` the common words come from ``rng`` and the rest (and the
        shuffle) from ``rng_rest``: the same distribution, but the answer does not change with the size."""
        if rng_rest is None:
            words = draw_words(rng, num_words)
            common, uncommon = words[:self.num_cw], words[self.num_cw:]
        else:
            common = draw_words(rng, self.num_cw)
            taken = set(common)
            uncommon = [w for w in draw_words(rng_rest, num_words) if w not in taken][:num_words - self.num_cw]
            rng = rng_rest
        word_list_ = common * common_repeats + uncommon * uncommon_repeats
        rng.shuffle(word_list_)
        return word_list_, common

    def ruler_incremental(self, context_length: int) -> int:
        return 10  # common_words_extraction.py sys_word_pair_random: words

    def ruler_upper(self, encoder: PromptEncoder, context_length: int, incremental: int) -> int:
        """sys_word_pair_random: a probe of 4096 words, ``int(max_seq_length // tokens_per_word) * 2``."""
        probe = self.calibration_count(encoder, context_length)(4096)
        return max(int(context_length // (probe / 4096)) * 2, incremental * 2)

    def _use_small(self, encoder: PromptEncoder, context_length: int) -> bool:
        """RULER switches to the larger example and repeats at max_seq_length >= 4096 (generate_input_output:
        ``if args.max_seq_length < 4096`` the small one). With a tokenizer less efficient than Llama's (the byte
        tokenizer, the reference model's 2k-word BPE) that configuration's smallest prompt can exceed the budget
        (ruler: prompt + generation over context_length, where RULER would retry forever; kvbench: prompt over
        90% of it); then the < 4096 configuration is used, and the sample's meta says so."""
        if context_length < 4096:
            return True
        k = ("small", *self._encoder_key(encoder, context_length))
        if k not in self._hints:
            smallest = self._build(encoder, context_length, (CALIBRATION, self.ruler_name), self.n_min, small=False)
            if self.official:
                self._hints[k] = self.count(encoder, smallest) + self.max_new_tokens > context_length
            else:
                # Margin: word lengths vary across samples, and the fit must reach 90% of the budget from below.
                self._hints[k] = self.count(encoder, smallest) > 0.9 * context_length
        return self._hints[k]

    def build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int) -> Sample:
        small = self._use_small(encoder, context_length)
        sample = self._build(encoder, context_length, key, n, small)
        if small and context_length >= 4096:
            sample.meta["ruler_config"] = "below-4096 example (the 4096+ one does not fit this tokenizer)"
        return sample

    def _build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int, small: bool) -> Sample:
        rng = rng_for(*key)
        head, tail, prefix = split_template("common_words_extraction")
        if small:
            shot_list, shot_answer = self._example(rng, 20, 3, 1)
            reps = (6, 1)
        else:
            shot_list, shot_answer = self._example(rng, 40, 10, 3)
            reps = (self.freq_cw, self.freq_ucw)
        shot = head + numbered(shot_list) + tail + prefix + " " + numbered(shot_answer)
        items, answer = self._example(rng, n, *reps, rng_rest=rng_for(*key, "haystack", n))
        common = set(answer)
        body = TextBuilder()
        for i, w in enumerate(items):
            if i:
                body.add(" ")
            label = f"{i + 1}. "
            if w in common:
                body.add(label + w, ("evidence", len(label), len(label) + len(w)))
            else:
                body.add(label + w)
        meta = {"haystack": self.haystack, "depth": None, "cwe_config": "small" if small else "large"}
        return make_sample(shot + "\n" + head, body, tail, prefix, answer, self.max_new_tokens, meta)


class FreqWordsTask(RulerTask):
    ruler_name = "fwe"
    category = "aggregation"
    metric = "string_match_all"
    haystack = "coded words"
    coded_wordlen = 6
    n_min = 30  # enough words for ranks 2-4 to appear at least once

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(CONFIGS["fwe"]["alpha"])
        self.max_new_tokens = 50  # constants.py: freq_words_extraction tokens_to_generate
        self._zeta = zeta(self.alpha)

    def ruler_incremental(self, context_length: int) -> int:
        """sys_kwext: ``incremental = input_max_len // 32``, input_max_len = max_seq_length - tokens_to_generate."""
        return (context_length - self.max_new_tokens) // 32

    def ruler_start(self, encoder: PromptEncoder, context_length: int) -> int | None:
        """freq_words_extraction.py generate_input_output's own search: from ``input_max_len // 6`` words up by
        ``incremental`` while the prompt is shorter than input_max_len, then one step back."""
        k = ("ruler", *self._encoder_key(encoder, context_length))
        if k not in self._hints:
            budget, inc = context_length - self.max_new_tokens, self.ruler_incremental(context_length)
            n = None
            if inc >= 1:
                count = self.calibration_count(encoder, context_length)
                n = budget // 6
                while count(n) < budget:
                    n += inc
                n -= inc
            self._hints[k] = n if n is not None and n >= self.n_min else None
        return self._hints[k]

    def ruler_down(self, used: int, incremental: int) -> int | None:
        """sys_kwext steps down without a floor; here not below ``n_min`` (fewer words lose the answer)."""
        return used - incremental if used - incremental >= self.n_min else None

    def build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int) -> Sample:
        rng = rng_for(*key)
        # sys_kwext: vocab_size = max_seq_length // 50 after the generation budget is taken off
        vocab_size = max(10, ((context_length - self.max_new_tokens) if self.official else context_length) // 50)
        vocab: list[str] = []
        seen: set[str] = set()
        while len(vocab) < vocab_size:
            w = "".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        vocab.sort()
        rng.shuffle(vocab)
        vocab[0] = "..."  # the top ranked word is noise
        answer = vocab[1:4]
        words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k ** -self.alpha / self._zeta))]
        rng_for(*key, "haystack", n).shuffle(words)
        wanted = set(answer)
        body = TextBuilder()
        for i, w in enumerate(words):
            if i:
                body.add(" ")
            body.add(w, "evidence") if w in wanted else body.add(w)
        head, tail, prefix = split_template("freq_words_extraction")
        meta = {"haystack": self.haystack, "depth": None, "vocab_size": vocab_size}
        return make_sample(head, body, tail, prefix, answer, self.max_new_tokens, meta)
