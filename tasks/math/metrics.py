"""Scoring a reasoning model's continuation: the thinking removed, the answer extracted and checked with math-verify.

- ``answer_part``: lighteval's ``remove_reasoning_tags`` (src/lighteval/utils/utils.py at 3fd1526: every closed
  ``<think>...</think>`` pair removed) with two cases lighteval leaves as they are: a ``</think>`` whose opening the
  prompt wrote (R1-style chat templates end with "<think>\\n"; the continuation then starts inside the block) or
  that comes without any opening keeps only what follows the last ``</think>``; a block still open at the end (the
  generation stopped inside the reasoning, e.g. at ``max_new_tokens``) leaves the text as it is, so the answer is
  extracted from the reasoning, as lighteval does. The second value says which case it was.
- gold: ``parse("\\boxed{" + answer + "}", [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])``
  of the dataset's ``answer`` field: the boxed form is what lighteval's MATH-500 gold is (the solution's
  ``\\boxed{...}``, boxed first: math_verify/tasks.py ``math_500_lighteval``) and, unlike ``$...$``, holds an answer
  with a dollar sign of its own ("\\$18.90").
- prediction: ``parse(answer_part, [LatexExtractionConfig(), ExprExtractionConfig()])`` (math-verify's default
  targets, lighteval's for predictions), then ``verify(gold, prediction)`` with its defaults (6 decimals, strict).

math-verify times parsing out with ``signal.alarm``, which only the main thread may set; elsewhere the timeouts
are off (``parsing_timeout=None``, ``timeout_seconds=None``), as its error message advises.
tests/fixtures/math/verify_cases.json holds the library's own results on fixed cases
(tools/official/dump_math_verify.py).
"""
from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

from tasks.math.config import THINK_CLOSE, THINK_OPEN

TIMEOUT_S = 5  # math-verify's default parsing_timeout and timeout_seconds


def answer_part(text: str, prompt_opens_think: bool = False) -> tuple[str, str]:
    """(the text the answer is extracted from, how the thinking was found): "none" (no tag), "closed" (removed),
    "unclosed" (a block still open at the end: the text as it is)."""
    result = THINK_OPEN + text if prompt_opens_think else text
    if THINK_OPEN not in result and THINK_CLOSE not in result:
        return text, "none"
    while THINK_OPEN in result and THINK_CLOSE in result:  # lighteval's loop
        start = result.find(THINK_OPEN)
        end = result.find(THINK_CLOSE, start)
        if end == -1:
            break
        result = result[:start] + result[end + len(THINK_CLOSE):]
    if THINK_CLOSE in result:  # a block opened before the text began
        result = result.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in result:
        return (text if prompt_opens_think and result == THINK_OPEN + text else result), "unclosed"
    return result, "closed"


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def gold_text(answer: str) -> str:
    return "\\boxed{" + answer + "}"


@lru_cache(maxsize=1024)
def parse_gold(answer: str) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return tuple(parse(gold_text(answer), [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                       parsing_timeout=_timeout()))


@lru_cache(maxsize=64)
def parse_prediction(text: str) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return tuple(parse(text, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=_timeout()))


def judge(prediction: str, answer: str, prompt_opens_think: bool = False) -> bool:
    """Whether the continuation's answer is equivalent to the dataset's ``answer`` (math-verify)."""
    from math_verify import verify

    part, _ = answer_part(prediction, prompt_opens_think)
    return bool(verify(list(parse_gold(answer)), list(parse_prediction(part)), timeout_seconds=_timeout()))


def extraction(prediction: str, prompt_opens_think: bool = False) -> dict[str, Any]:
    """What a row records of its continuation: the extracted answer (the text math-verify matched; None if none)
    and how the thinking was found (``answer_part``)."""
    part, think = answer_part(prediction, prompt_opens_think)
    parsed = parse_prediction(part)
    text = next((p for p in parsed if isinstance(p, str)), None)
    if text is None and parsed:
        text = str(parsed[0])
    return {"extracted_answer": text, "think": think}
