"""Question answering over many documents (``qa_1``: SQuAD 2.0 dev, ``qa_2``: HotpotQA dev distractor).

After NVIDIA/RULER scripts/data/synthetic/qa.py. The documents answering the question (SQuAD: its
paragraph; HotpotQA: the question's 10 paragraphs) are mixed with other paragraphs of the same article
(SQuAD), then random paragraphs of the dataset, shuffled, as ``Document {i}:\\n{text}`` joined by blank
lines. The haystack size is the number of documents. Metric: string_match_part.

Shuffle: with ``length_rule=ruler`` as qa.py, ``random.Random(seed).shuffle`` of [gold documents (HotpotQA:
the question's paragraphs in file order), distractors]: a fixed-seed permutation, so at one seed every sample
with the same number of documents has its gold document at the same position (``meta["gold_doc_index"]``).
With ``length_rule=kvbench`` each sample shuffles with its own random stream (supporting paragraphs first).

Data (``task.data_dir``; nothing is downloaded):
  - qa_1: ``dev-v2.0.json`` (or RULER's name ``squad.json``), the official SQuAD 2.0 dev file;
  - qa_2: ``hotpot_dev_distractor_v1.json`` (or RULER's name ``hotpotqa.json``), the official HotpotQA file.
Questions: RULER takes the file's first answerable questions in order; here sample ``index`` of ``seed``
takes question ``permutation(seed)[index]`` so that seeds differ. Below RULER's smallest size (fewer
documents than the HotpotQA question's 10) the supporting paragraphs are kept first.

``meta["evidence"]``: SQuAD: spans of the gold answers inside the gold paragraph (the paragraph itself if
none matches); HotpotQA: spans of the supporting-fact sentences. ``meta["depth"]``: position in percent of
the first gold document among the documents.
"""
from __future__ import annotations

import random
from pathlib import Path

from harness.errors import KvbenchError
from harness.paths import read_json
from tasks.base import PromptEncoder, Sample
from tasks.ruler.common import RULER_SEED, RulerTask, TextBuilder, depth_percent, make_sample, rng_for
from tasks.ruler.templates import CONFIGS, DOCUMENT_PROMPT, split_template

FILES = {
    "squad": (("dev-v2.0.json", "squad.json"), "SQuAD", "https://rajpurkar.github.io/SQuAD-explorer/"),
    "hotpotqa": (("hotpot_dev_distractor_v1.json", "hotpotqa.json"), "HotpotQA", "https://hotpotqa.github.io/"),
}
_CACHE: dict[str, tuple[list[dict], list[str]]] = {}


def _fetch_hint(dataset: str) -> str:
    return f"get the official {FILES[dataset][1]} file from {FILES[dataset][2]}"


def _texts(*values) -> list[str]:
    """``values`` if they are strings; TypeError otherwise (the caller names the file)."""
    for v in values:
        if not isinstance(v, str):
            raise TypeError(f"{v!r} where a string is due")
    return list(values)


def read_squad(path: Path) -> tuple[list[dict], list[str]]:
    """RULER's read_squad: unique paragraphs sorted; answerable questions with their paragraph and the
    article's other paragraphs."""
    data = read_json(path, _fetch_hint("squad"))
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            ci = index[p["context"]]
            for qa in p["qas"]:
                if qa.get("is_impossible"):
                    continue
                answers = _texts(*(a["text"] for a in qa["answers"]))
                qas.append({"query": _texts(qa["question"])[0], "outputs": answers, "context": [ci],
                            "more_context": [i for i in article if i != ci], "support": None})
    return qas, docs


def read_hotpotqa(path: Path) -> tuple[list[dict], list[str]]:
    """RULER's read_hotpotqa: documents ``title\\n`` + joined sentences; a question's documents are its 10
    paragraphs. Supporting facts are kept (as character spans inside their document) for the evidence."""
    data = read_json(path, _fetch_hint("hotpotqa"))
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data:
        ctx = [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]
        sents = {t: p for t, p in d["context"]}
        support: dict[int, list[list[int]]] = {}
        for title, sid in d.get("supporting_facts", []):
            para = sents.get(title)
            if para is None or not 0 <= sid < len(para):
                continue
            start = len(title) + 1 + sum(len(s) for s in para[:sid])
            support.setdefault(index[f"{title}\n{''.join(para)}"], []).append([start, start + len(para[sid])])
        gold = [i for i in ctx if i in support] + [i for i in ctx if i not in support]  # supporting first
        # "file_order": RULER's context (length_rule=ruler); "context": supporting first (kvbench's rule)
        qas.append({"query": _texts(d["question"])[0], "outputs": _texts(d["answer"]), "context": gold, "more_context": [],
                    "support": support, "n_support": max(1, len(support)), "file_order": ctx})
    return qas, docs


class QaTask(RulerTask):
    category = "qa"
    metric = "string_match_part"
    haystack = "documents"
    n_min = 1
    reads_data = True

    def __init__(self, ruler_name: str, **kwargs):
        self.ruler_name = ruler_name
        super().__init__(**kwargs)
        self.dataset = CONFIGS[ruler_name]["dataset"]
        self.max_new_tokens = 32  # constants.py: qa tokens_to_generate
        self._orders: dict[int, list[int]] = {}

    # -- data --------------------------------------------------------------------------------------------
    def _path(self) -> Path:
        names, label, url = FILES[self.dataset]
        if self.data_dir:
            for n in names:
                p = Path(self.data_dir).expanduser() / n
                if p.is_file():
                    return p
            raise KvbenchError(f"{self.name} needs {label}: no {names[0]} in task.data_dir={self.data_dir} ({url})")
        raise KvbenchError(f"{self.name} needs {label}: put {names[0]} in task.data_dir=<dir> ({url})")

    def data(self) -> tuple[list[dict], list[str]]:
        path = self._path()
        key = f"{self.dataset}:{path.resolve()}"
        if key not in _CACHE:
            reader = read_squad if self.dataset == "squad" else read_hotpotqa
            try:
                _CACHE[key] = reader(path)
            # what walking JSON of another structure raises (a list where an object is due, a missing key, ...)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
                raise KvbenchError(f"{self.name}: {path} is not in the official {FILES[self.dataset][1]} format "
                                   f"({type(err).__name__}: {err})") from None
            if not _CACHE[key][0]:
                raise KvbenchError(f"{self.name}: {path} has no answerable question")
        return _CACHE[key]

    def _order(self, seed: int) -> list[int]:
        if seed not in self._orders:
            order = list(range(len(self.data()[0])))
            rng_for(self.ruler_name, "question-order", seed).shuffle(order)
            self._orders[seed] = order
        return self._orders[seed]

    # -- generation --------------------------------------------------------------------------------------
    def ruler_incremental(self, context_length: int) -> int:
        return 10  # qa.py generate_samples: documents

    def sample_key(self, seed: int, index: int) -> tuple:
        order = self._order(seed)
        return (self.ruler_name, seed, index, order[index % len(order)])

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int, seed: int) -> list[Sample]:
        n = min(n_samples, len(self.data()[0]))
        return [self.sample(encoder, context_length, seed, i) for i in range(n)]

    def build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int) -> Sample:
        qas, docs = self.data()
        qa = qas[key[3] if len(key) == 4 else 0]
        order = "file_order" if self.official and "file_order" in qa else "context"
        curr, more = list(qa[order]), list(qa["more_context"])
        needed = qa.get("n_support", 1)
        n = max(n, needed)
        h = rng_for(*key, "haystack", n)
        if n < len(docs):
            if n - len(curr) > len(more):
                taken = set(curr) | set(more)
                addition = [i for i in range(len(docs)) if i not in taken]
                chosen = curr + more + h.sample(addition, max(0, n - len(curr) - len(more)))
            elif n >= len(curr):
                chosen = curr + h.sample(more, n - len(curr))
            else:  # below RULER's range (HotpotQA): keep the supporting paragraphs first
                chosen = list(qa["context"])[:n]
        else:
            repeats = (n + len(docs) - 1) // len(docs)
            chosen = (list(range(len(docs))) * repeats)[:n]
        if self.official:  # qa.py: random.Random(args.random_seed).shuffle(all_docs), the same order for every sample
            random.Random(key[1] if len(key) == 4 else RULER_SEED).shuffle(chosen)
        else:
            h.shuffle(chosen)

        gold = set(qa["support"]) if qa["support"] else set(qa["context"])
        body = TextBuilder()
        positions = []
        for i, di in enumerate(chosen):
            if i:
                body.add("\n\n")
            label = DOCUMENT_PROMPT.format(i=i + 1, document="")
            text = docs[di]
            marks: list = []
            if di in gold:
                positions.append(i)
                marks.append(("gold_doc_spans", len(label), len(label) + len(text)))
                marks.extend(("evidence", len(label) + b, len(label) + e) for b, e in self._evidence(qa, di, text))
            body.add(label + text, *marks)
        head, tail, prefix = split_template("qa")
        meta = {"haystack": self.haystack, "dataset": self.dataset, "question_index": key[3] if len(key) == 4 else 0,
                "depth": depth_percent(positions[0], len(chosen)) if positions else None, "n_docs": len(chosen),
                "gold_doc_index": positions}
        return make_sample(head, body, tail.format(query=qa["query"]), prefix, qa["outputs"], self.max_new_tokens, meta)

    @staticmethod
    def _evidence(qa: dict, di: int, text: str) -> list[tuple[int, int]]:
        if qa["support"] is not None:
            return [(b, e) for b, e in qa["support"].get(di, [(0, len(text))])]
        spans = []
        low = text.lower()
        for a in dict.fromkeys(qa["outputs"]):
            if not a:
                continue
            start = low.find(a.lower())
            while start >= 0:
                spans.append((start, start + len(a)))
                start = low.find(a.lower(), start + 1)
        return spans or [(0, len(text))]
