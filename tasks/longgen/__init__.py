"""Long-generation tasks (``task=longgen``): answers of hundreds of tokens, so that compression during decoding
(``decoding.target_size`` / ``decoding.compression_interval``) cuts the cache several times within one answer.

Registers ``longgen/recite`` (suite "longgen"): recite a number of ``task.digits`` digits (256 by default) hidden in
RULER's niah_single_1 haystack, scored by the share of its 8-digit chunks recited in order (``task.metric=prefix``:
the longest correct prefix). tasks/longgen/recite.py has the prompt, docs/longgen.md what the reference model does
with it, full cache and compressed.
"""
from __future__ import annotations

from tasks import register
from tasks.longgen.metric import METRICS, chunk_score, prefix_score, recite_score, recited_digits
from tasks.longgen.recite import ReciteTask

register("longgen/recite", suite="longgen")(ReciteTask)

__all__ = ["ReciteTask", "METRICS", "chunk_score", "prefix_score", "recite_score", "recited_digits"]
