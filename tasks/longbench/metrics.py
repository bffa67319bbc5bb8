"""LongBench per-sample metrics, written to give the same numbers as LongBench/metrics.py and eval.py.

Source: THUDM/LongBench at 2e00731, LongBench/metrics.py (metric functions) and LongBench/eval.py
(``dataset2metric``, the first-line rule for trec/triviaqa/samsum/lsht, max over the gold answers).
``tests/test_longbench_metrics.py`` checks every function against the official module on hand-made cases.

Behaviour kept on purpose, because the official scores depend on it:

- ``rouge``/``rouge_zh`` use the PyPI ``rouge`` package (1.0.1) and give 0.0 on *any* error it raises, as the
  official bare ``except`` does: an empty (or all-"." ) prediction, and also a RecursionError from the
  package's recursive LCS reconstruction on very long texts (over roughly 1000 words of LCS path).
- ``classification`` removes items from the matched list while iterating over it, so the item after a
  removed one is never checked; ``_drop_substrings`` reproduces that exactly.
- ``code_sim`` is ``fuzzywuzzy.fuzz.ratio`` itself (integer percent), so it matches the official code run
  in the same environment: with python-Levenshtein installed fuzzywuzzy uses its ratio, without it
  difflib's SequenceMatcher (the official requirements.txt does not pin either).
"""
from __future__ import annotations

import logging
import re
import string
from collections import Counter
from typing import Callable, Sequence

from tasks.longbench.config import FIRST_LINE, METRIC

_CN_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _jieba_cut(text: str) -> list[str]:
    import jieba

    if not getattr(_jieba_cut, "_quiet", False):
        jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" chatter on stderr
        _jieba_cut._quiet = True
    return list(jieba.cut(text, cut_all=False))


# ------------------------------------------------------------------------------------------ normalization
def normalize_answer(s: str) -> str:
    """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD style)."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def normalize_zh_answer(s: str) -> str:
    """Lower case, drop ASCII and Chinese punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in s.lower() if ch not in _ALL_PUNCT).split())


# ------------------------------------------------------------------------------------------------ metrics
def f1_score(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Token-multiset F1 of two token lists (0 when nothing is shared)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(w) for w in _jieba_cut(text)) if t]

    return f1_score(tokens(prediction), tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F of the ``rouge`` package; 0.0 whenever the package raises (see module docstring)."""
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except Exception:  # noqa: BLE001 - the official code swallows every error into a zero
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def _fraction_equal(prediction: str, target: str) -> float:
    """Share of the integers written in ``prediction`` that equal ``target`` (0 when there are none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == str(target)) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_) -> float:
    return _fraction_equal(prediction, ground_truth)


def _paragraph_id(ground_truth: str, pattern: str) -> str:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"LongBench retrieval answer {ground_truth!r} has no paragraph number ({pattern})")
    return found[0]


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    return _fraction_equal(prediction, _paragraph_id(ground_truth, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    return _fraction_equal(prediction, _paragraph_id(ground_truth, r"段落(\d+)"))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """fuzz.ratio / 100 between the gold line and the first predicted line that is not a comment or fence.

    A line counts as code unless it contains a backtick, '#' or '//'; no such line gives an empty prediction.
    """
    from fuzzywuzzy import fuzz

    first = next((line for line in prediction.lstrip("\n").split("\n")
                  if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz.ratio(first, ground_truth) / 100


def _drop_substrings(matched: list[str], ground_truth: str) -> list[str]:
    """The official loop ``for t in lst: if t in gt and t != gt: lst.remove(t)`` with its skip-after-remove.

    A list iterator walks by index; ``remove`` deletes the first equal item and shifts the rest left, so the
    item right after a removed one is skipped. Emulated step by step (``remove`` semantics included).
    """
    matched = list(matched)
    i = 0
    while i < len(matched):
        term = matched[i]
        if term in ground_truth and term != ground_truth:
            matched.remove(term)
        i += 1
    return matched


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None,
                         **_) -> float:
    """1/k when the gold class is among the k classes named in the prediction (substrings of it dropped)."""
    if all_classes is None:
        raise ValueError("LongBench classification needs all_classes (the sample's 'all_classes' field)")
    matched = _drop_substrings([c for c in all_classes if c in prediction], ground_truth)
    return 1.0 / len(matched) if ground_truth in matched else 0.0


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def dataset_of(name: str) -> str:
    """'longbench/trec', 'longbench_e/trec' or 'trec' -> 'trec'."""
    short = name.rsplit("/", 1)[-1]
    if short not in METRIC:
        raise KeyError(f"not a LongBench dataset: {name!r}")
    return short


def first_line(prediction: str) -> str:
    """eval.py: ``prediction.lstrip('\\n').split('\\n')[0]``."""
    return prediction.lstrip("\n").split("\n")[0]


def score(dataset: str, prediction: str, answers: Sequence[str] | str,
          all_classes: Sequence[str] | None = None) -> float:
    """The official per-sample score in [0, 1]: first-line rule where official, then max over the answers."""
    dataset = dataset_of(dataset)
    if dataset in FIRST_LINE:
        prediction = first_line(prediction)
    if isinstance(answers, str):
        answers = [answers]
    metric = METRICS[METRIC[dataset]]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes))
    return float(best)


__all__ = ["normalize_answer", "normalize_zh_answer", "f1_score", "qa_f1_score", "qa_f1_zh_score", "rouge_score",
           "rouge_zh_score", "count_score", "retrieval_score", "retrieval_zh_score", "code_sim_score",
           "classification_score", "METRICS", "dataset_of", "first_line", "score"]
