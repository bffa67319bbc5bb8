"""Needle in a haystack (8 RULER tasks), after NVIDIA/RULER scripts/data/synthetic/niah.py.

Needles ``One of the special magic {numbers|uuids} for {key} is: {value}.`` are hidden in a haystack of
noise sentences (joined by newlines), Paul Graham essay sentences (joined by spaces) or distractor needles
(joined by newlines). Keys are adjective-noun words or uuids, values 7-digit numbers or uuids.

Depth: RULER draws each needle's depth from a 40-point grid over 0..100 % (essay haystack: insertion
before sentence ``int(len(sentences) * depth / 100)``) or a uniform random line (noise and needle
haystacks). Task param ``depth`` (0..100) puts every needle at that depth instead (for depth heatmaps).
``meta["depth"]`` is the depth in percent of the first queried needle, ``meta["depths"]`` that of every
needle in context order, ``meta["evidence"]`` the character spans of the answer values in ``context``
and ``meta["needle_spans"]`` the spans of every needle sentence.
"""
from __future__ import annotations

from tasks.base import PromptEncoder, Sample
from tasks.ruler.common import (RulerTask, TextBuilder, depth_percent, load_essays, make_sample, random_needle,
                                rng_for)
from tasks.ruler.templates import CONFIGS, DEPTHS, NOISE, needle_sentence, niah_prompt


class NiahTask(RulerTask):
    category = "retrieval"
    metric = "string_match_all"
    supports_depth = True

    def __init__(self, ruler_name: str, **kwargs):
        self.ruler_name = ruler_name
        self.cfg = CONFIGS[ruler_name]
        self.reads_data = self.cfg["type_haystack"] == "essay"  # noise and needle haystacks are generated
        super().__init__(**kwargs)
        self.haystack = self.cfg["type_haystack"]
        self.max_new_tokens = 128  # constants.py: niah tokens_to_generate
        self.num_k = max(self.cfg["num_needle_k"], self.cfg["num_needle_q"])
        self.n_needles = self.num_k * self.cfg["num_needle_v"]
        self.n_min = 10 if self.haystack == "essay" else self.n_needles

    def ruler_incremental(self, context_length: int) -> int:
        """niah.py generate_samples: 500 essay words, 25 noise / needle lines (5 below max_seq_length 4096)."""
        if self.haystack == "essay":
            return 500
        return 5 if context_length < 4096 else 25

    def build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int) -> Sample:
        cfg = self.cfg
        type_k, type_v = cfg["type_needle_k"], cfg["type_needle_v"]
        rng = rng_for(*key)  # draws that do not depend on the haystack size come first

        # needles: (text, key index, value)
        needles: list[tuple[str, int, str]] = []
        keys: list[str] = []
        values: list[list[str]] = []
        for ki in range(self.num_k):
            keys.append(random_needle(rng, type_k))
            values.append([])
            for _ in range(cfg["num_needle_v"]):
                v = random_needle(rng, type_v)
                values[-1].append(v)
                needles.append((needle_sentence(type_v, keys[-1], v), ki, v))
        rng.shuffle(needles)
        if self.questions == 1:
            query_sets = [rng.sample(range(self.num_k), cfg["num_needle_q"])]
        else:  # several questions about this haystack, each on keys of its own (questions_per_context)
            per = self.keys_per_question()
            drawn = rng.sample(range(self.num_k), per * self.questions)
            query_sets = [drawn[j * per:(j + 1) * per] for j in range(self.questions)]
        question_of = {ki: j for j, qs in enumerate(query_sets) for ki in qs}
        queried = set(question_of)

        h = rng_for(*key, "haystack", n)  # draws that depend on the haystack size
        body = TextBuilder()
        depths: list[int] = []
        meta: dict = {"haystack": self.haystack}

        def add_needle(text: str, ki: int, value: str) -> None:
            marks: list = ["needle_spans"]
            if ki in queried:
                b = len(text) - 1 - len(value)
                marks.append((evidence_tag(question_of[ki]), b, b + len(value)))
            body.add(text, *marks)

        order: list[tuple[str, int, str]] = []  # needles in context order
        if self.haystack == "essay":
            corpus = load_essays(self.data_dir)
            meta["fallback_haystack"] = corpus.fallback
            sents = corpus.sentences_for(n)
            drawn = rng.sample(DEPTHS, len(needles)) if self.depth is None else [self.depth] * len(needles)
            drawn = sorted(drawn)
            positions = [0] + [int(len(sents) * (d / 100)) for d in drawn] + [len(sents)]
            for i in range(1, len(positions)):
                if i > 1:
                    body.add(" ")
                body.add(" ".join(sents[positions[i - 1]:positions[i]]))
                if i - 1 < len(needles):
                    body.add(" ")
                    add_needle(*needles[i - 1])
                    order.append(needles[i - 1])
            depths = [int(round(d)) if self.depth is None else self.depth for d in drawn]
        else:
            if self.haystack == "noise":
                lines: list = [NOISE] * n
            else:  # "needle": distractor needles with random keys and values
                lines = [needle_sentence(type_v, random_needle(h, type_k), random_needle(h, type_v)) for _ in range(n)]
            if self.depth is None:
                indexes = sorted(h.sample(range(n), len(needles)), reverse=True)
            else:
                indexes = [int(n * self.depth / 100)] * len(needles)
            placed = []
            for index, needle in zip(indexes, needles):
                lines.insert(index, needle)
                placed.append((index, needle))
            for i, line in enumerate(lines):
                if i:
                    body.add("\n")
                if isinstance(line, tuple):
                    add_needle(*line)
                    order.append(line)
                else:
                    body.add(line)
            where = {id(nd): ix for ix, nd in placed}
            depths = [self.depth if self.depth is not None else depth_percent(where[id(nd)], n) for nd in order]

        built = []
        for j, query_idx in enumerate(query_sets):
            queries = [keys[i] for i in query_idx]
            answers = [a for i in query_idx for a in values[i]]
            head, question, prefix = niah_prompt(type_v, queries, singular=len(query_idx) * cfg["num_needle_v"] == 1)
            first_q = next(i for i, nd in enumerate(order) if nd[1] in query_idx)
            one = make_sample(head, body, question, prefix, answers, self.max_new_tokens,
                              {**meta, "depth": depths[first_q], "depths": depths, "queries": queries,
                               **({"keys_per_question": len(query_idx)} if self.questions > 1 else {})})
            one.meta["evidence"] = one.meta.get(evidence_tag(j), [])
            for k in range(1, len(query_sets)):
                one.meta.pop(evidence_tag(k), None)
            built.append(one)
        built[0].more_questions = built[1:]
        return built[0]

    def max_questions_per_context(self) -> int:
        """One question per key hidden in the haystack (multikey_1: 4 keys, one queried by each question;
        multiquery: its 4 keys, asked one question at a time); a single-key haystack carries one question."""
        return self.num_k

    def keys_per_question(self) -> int:
        """Keys each of ``questions`` questions asks: the task's own count where the haystack holds that many
        distinct keys for every question, else as many as the keys shared out allow (niah_multiquery's 4 keys:
        2 per question for 2 questions, 1 for 3 or 4). Rows record it (``meta["keys_per_question"]``)."""
        return min(self.cfg["num_needle_q"], self.num_k // self.questions)


def evidence_tag(question: int) -> str:
    """The TextBuilder mark of the values question ``question`` asks for (``evidence`` for the first)."""
    return "evidence" if question == 0 else f"evidence_q{question}"


NIAH_TASKS = [name for name, cfg in CONFIGS.items() if cfg["task"] == "niah"]
