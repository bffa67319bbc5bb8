"""RULER's per-sample metrics and prediction post-processing.

Source: NVIDIA/RULER scripts/eval/synthetic/constants.py (string_match_all for niah, variable_tracking,
common_words_extraction, freq_words_extraction; string_match_part for qa) and scripts/eval/evaluate.py
(postprocess_pred). RULER averages over samples and multiplies by 100; here one sample gives [0, 1].
"""
from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """Strip, turn every control character (\\x00-\\x1f) into a newline, strip again (evaluate.py)."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of the gold answers contained in the prediction, case-insensitive."""
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(1.0 for a in answers if a.lower() in pred) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1 if any gold answer is contained in the prediction, case-insensitive, else 0."""
    pred = prediction.lower()
    return 1.0 if any(a.lower() in pred for a in answers) else 0.0


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}
