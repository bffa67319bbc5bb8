"""InfiniteBench per-sample metrics, written to give the numbers of the official src/compute_scores.py.

Source: OpenBMB/InfiniteBench at 88b3daa (src/compute_scores.py ``get_score_one`` and its ``get_score_one_<task>``
functions, code_debug's as fixed in e60e8dc). ``tests/fixtures/infinitebench/metric_cases.json`` holds cases scored
by running that code (``tools/official/dump_infinitebench_metrics.py``); ``tests/test_infinitebench.py`` checks every
function here against them.

Every function takes the official label (``eval_utils.get_answer``'s value: the record's ``answer``, or
``[option text, letter]`` for the two multiple-choice tasks) and returns the official score as a float.
``score(task, prediction, answers)`` takes kvbench's ``Sample.answers`` (the label's items as strings) and turns them
back into the label's type first (``label_of``).

Kept on purpose, because the official scores depend on it: longbook_qa_chn's F1 is over characters (not jieba
words as LongBench's), longdialogue_qa_eng only looks for the first gold name and compares it with the upper-cased
words of the prediction, longbook_choice_eng's ``word in "ABCD"`` is a substring test. longbook_sum_eng is
``evaluate.load("rouge")``'s rougeLsum: google-research's rouge_score (0.1.2) with its default tokenizer (lower
case, runs of characters outside [a-z0-9] are separators, no stemming), sentences split on newlines, summary-level
union LCS (``rouge_lsum``, reimplemented here: the ``rouge`` package kvbench has for LongBench is another ROUGE).

Deviations, where the official code cannot score the hub's records (docs/infinitebench.md): a kv_retrieval label
that is a list (the hub's ``answer`` is one) is its first item (the official ``label in words`` is then always
False; OpenBMB/InfiniteBench pull request 23); numeric labels given as strings (a loader that cast the hub's ``answer``
to strings) are read back as numbers, where the official code compares a string with an int or raises TypeError.
"""
from __future__ import annotations

import collections
import re
from typing import Any, Callable, Sequence

from tasks.longbench.metrics import f1_score, normalize_answer, normalize_zh_answer

# ---------------------------------------------------------------------------------------------- retrieval
_KV_SEPARATORS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")  # get_score_one_kv_retrieval's


def first_int_match(prediction: str) -> str:
    """The first run of ASCII digits in ``prediction`` ("" when there is none)."""
    return next((item for item in re.split("[^0-9]", prediction) if item != ""), "")


def _first(label: Any) -> Any:
    return label[0] if isinstance(label, list) else label


def passkey_score(prediction: str, label: Any) -> float:
    """passkey and number_string: the first integer of the prediction equals the label (as strings)."""
    return float(_first(label) == first_int_match(prediction))


def kv_retrieval_score(prediction: str, label: Any) -> float:
    """The gold value is one of the prediction's words (split on whitespace and ``\\n : " ' . , ? ! { }``)."""
    for c in _KV_SEPARATORS:
        prediction = prediction.replace(c, " ")
    return float(_first(label) in prediction.split())


# ---------------------------------------------------------------------------------------------- code
def code_run_score(prediction: str, label: Any) -> float:
    """The last word of the prediction (split on whitespace and ``\\n . ` ' " :``) is the gold integer."""
    label = _first(label)
    prediction = prediction.strip()
    for c in ("\n", ".", "`", "'", '"', ":"):
        prediction = prediction.replace(c, " ")
    words = prediction.split()
    if not words:
        return 0.0
    try:
        return float(label == int(words[-1]))
    except ValueError:
        return 0.0


_DEBUG_PREFIXES = ("answer is:", "is:", "answer:", "correct option is:")


def code_debug_score(prediction: str, label: Sequence[str]) -> float:
    """``label = [function name, letter]``: the prediction starts with "<letter>." / "<letter>:", or the text after
    the first answer phrase found (in ``_DEBUG_PREFIXES`` order) starts with the letter or the function name."""
    fn_name, letter = label[0], label[1]
    prediction = prediction.strip()
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    prediction = _spaced(prediction, ("\n", "`", "'", '"', "-", "*", "Option", "option"))
    after = _after_phrase(prediction, _DEBUG_PREFIXES)
    if after is not None:
        return float(after != "" and (after.startswith(letter) or after.startswith(fn_name)))
    return 0.0


# ---------------------------------------------------------------------------------------------- math
_FIRST_NUMBER = re.compile(r"\d+\.\d+|\d+")


def math_find_score(prediction: str, label: Any) -> float:
    """The first number written in the prediction equals the gold int (as an int) or float (as a float)."""
    label = _first(label)
    if not isinstance(label, (int, float)):
        raise TypeError(f"math_find needs an int or float label, not {type(label).__name__}")
    found = _FIRST_NUMBER.search(prediction)
    if found is None:
        return 0.0
    text = found.group(0).strip()
    if isinstance(label, float):
        return float(float(text) == label)
    if "." in text:  # "88.5" for an int label: the official int("88.5") raises ValueError; kvbench scores 0
        return 0.0
    return float(int(text) == label)


def math_calc_score(prediction: str, label: Sequence[Any]) -> float:
    """Share of the gold intermediate values the prediction's integers reproduce before the first mistake.

    (The official code drops the prediction's first number for GPT-4, whose chat prompt makes it repeat the
    expression's first number; kvbench does not offer that prompt, so never.)"""
    if isinstance(label[0], list):
        label = label[0]
    numbers = [int(item) for item in re.split("[^0-9]", prediction) if item != ""]
    correct = 0
    for gold, predicted in zip(label, numbers):
        if gold != predicted:
            break
        correct += 1
    return correct / len(label)


# ---------------------------------------------------------------------------------------------- novels, dialogue
_DIALOGUE_SEPARATORS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")


def dialogue_score(prediction: str, label: Sequence[str]) -> float:
    """The first gold name is one of the upper-cased words of the prediction."""
    name = label[0]
    prediction = prediction.strip()
    for c in _DIALOGUE_SEPARATORS:
        prediction = prediction.replace(c, " ")
    return float(name in [w.upper() for w in prediction.split()])


_CHOICE_PREFIXES = ("answer is:", "answer:", "answer is", "option is")



def _spaced(text: str, marks) -> str:
    """compute_scores.py's clean-up before it looks for an answer phrase: each mark replaced by a space, runs of
    spaces collapsed."""
    for c in marks:
        text = text.replace(c, " ")
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def _after_phrase(text: str, phrases) -> str | None:
    """The text after the first of ``phrases`` found (in their order) and one more character, "" when the text ends
    with the phrase; None when no phrase is there (compute_scores.py's loops over its answer phrases)."""
    for phrase in phrases:
        idx = text.find(phrase)
        if idx == -1:
            continue
        if len(text) < idx + len(phrase) + 1:
            return ""
        return text[idx + len(phrase) + 1:]
    return None

def choice_score(prediction: str, label: Sequence[str]) -> float:
    """``label = [option text, letter]``: a leading A-D, the whole prediction, the text after an answer phrase, or
    else the first word that is a substring of "ABCD" decides."""
    prediction = prediction.strip()
    if prediction == "":
        return 0.0
    if prediction[0] in "ABCD":
        return float(prediction[0] in label)
    if prediction in label:
        return 1.0
    prediction = _spaced(prediction, ("\n", '"', "'", ".", ",", "?", "!", "{", "}"))
    after = _after_phrase(prediction, _CHOICE_PREFIXES)
    if after is not None:
        return float(after != "" and any(after.startswith(s) for s in label))
    for word in prediction.split():
        if word in "ABCD":  # a substring test, as the official code's
            return float(word in label)
    return 0.0


def qa_f1(prediction: str, labels: Sequence[str]) -> float:
    """Best SQuAD-style token F1 over the gold answers (compute_scores.qa_f1_score)."""
    tokens = normalize_answer(prediction).split()
    return float(max((f1_score(tokens, normalize_answer(g).split()) for g in labels), default=0.0))


def qa_f1_zh_chars(prediction: str, labels: Sequence[str]) -> float:
    """Best F1 over the gold answers of the normalized characters (compute_scores.qa_f1_score_zh)."""
    chars = list(normalize_zh_answer(prediction))
    return float(max((f1_score(chars, list(normalize_zh_answer(g))) for g in labels), default=0.0))


# ---------------------------------------------------------------------------------------------- rougeLsum
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score.tokenize.tokenize(text, stemmer=None)."""
    return [t for t in re.split(r"\s+", _NON_ALNUM.sub(" ", text.lower())) if _VALID_TOKEN.match(t)]


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    """Indices into ``ref`` of one longest common subsequence, read back as rouge_score's _backtrack_norec."""
    rows, cols = len(ref), len(can)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        prev, cur, r = table[i - 1], table[i], ref[i - 1]
        for j in range(1, cols + 1):
            cur[j] = prev[j - 1] + 1 if r == can[j - 1] else max(prev[j], cur[j - 1])
    out: list[int] = []
    i, j = rows, cols
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def _summary_level_lcs_f(ref_sents: list[list[str]], can_sents: list[list[str]]) -> float:
    if not ref_sents or not can_sents:
        return 0.0
    m, n = sum(map(len, ref_sents)), sum(map(len, can_sents))
    if not n or not m:
        return 0.0
    left_r = collections.Counter(t for s in ref_sents for t in s)
    left_c = collections.Counter(t for s in can_sents for t in s)
    hits = 0
    for ref in ref_sents:
        union = sorted(set().union(*[_lcs_indices(ref, can) for can in can_sents]))
        for t in (ref[i] for i in union):
            if left_c[t] > 0 and left_r[t] > 0:  # no token counted twice (ROUGE 1.5.5)
                hits += 1
                left_c[t] -= 1
                left_r[t] -= 1
    recall, precision = hits / m, hits / n
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _sentences(text: str) -> list[list[str]]:
    return [rouge_tokens(s) for s in text.split("\n") if len(s)]


def rouge_lsum(prediction: str, label: Any) -> float:
    """rougeLsum F of ``evaluate``'s rouge: the best over the references when the label is a list."""
    refs = label if isinstance(label, list) else [label]
    pred = _sentences(prediction)
    return float(max(_summary_level_lcs_f(_sentences(r), pred) for r in refs))


# ---------------------------------------------------------------------------------------------- dispatch
METRICS: dict[str, Callable[[str, Any], float]] = {
    "first_int_match": passkey_score,
    "kv_word_match": kv_retrieval_score,
    "rouge_lsum": rouge_lsum,
    "choice_match": choice_score,
    "qa_f1": qa_f1,
    "qa_f1_zh_chars": qa_f1_zh_chars,
    "dialogue_name_match": dialogue_score,
    "first_number_match": math_find_score,
    "prefix_match_ratio": math_calc_score,
    "last_int_match": code_run_score,
    "debug_option_match": code_debug_score,
}

_INT = re.compile(r"[+-]?\d+")


def _number(text: str) -> int | float:
    return int(text) if _INT.fullmatch(text.strip()) else float(text)


def label_of(task: str, answers: Sequence[str]) -> Any:
    """The official label of a sample from its ``answers`` (the label's items as strings, ``answers_of``)."""
    if task == "math_find":
        return _number(answers[0])
    if task == "code_run":
        return int(answers[0])
    if task == "math_calc":
        return [int(a) for a in answers]
    if task in ("passkey", "number_string", "kv_retrieval"):
        return answers[0]
    return list(answers)


def answers_of(task: str, label: Any) -> list[str]:
    """``Sample.answers`` of an official label: its items as strings (JSON-able, and ``label_of`` reads them back)."""
    if task == "math_calc" and isinstance(label, list) and label and isinstance(label[0], list):
        label = label[0]
    items = label if isinstance(label, list) else [label]
    return [str(x) for x in items]


def score(task: str, prediction: str, answers: Sequence[str]) -> float:
    """The official per-sample score in [0, 1] of a raw continuation, from the sample's ``answers``."""
    from tasks.infinitebench.config import METRIC

    return METRICS[METRIC[task]](prediction, label_of(task, answers))


__all__ = ["first_int_match", "passkey_score", "kv_retrieval_score", "code_run_score", "code_debug_score",
           "math_find_score", "math_calc_score", "dialogue_score", "choice_score", "qa_f1", "qa_f1_zh_chars",
           "rouge_tokens", "rouge_lsum", "METRICS", "label_of", "answers_of", "score"]
