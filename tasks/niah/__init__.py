"""Needle in a Haystack (``task=niah``): Greg Kamradt's pressure test, scored as NVIDIA/kvpress scores it.

One needle sentence (gkamradt's default: "The best thing to do in San Francisco is eat a sandwich and sit in
Dolores Park on a sunny day.") is hidden in Paul Graham essays at each depth of a grid (percent of the haystack)
for each context length, and the model is asked the retrieval question. Construction (gkamradt/
LLMTest_NeedleInAHaystack, llm_needle_haystack_tester.py): the essays are cut to the length minus
``final_context_length_buffer`` (200) in the model's own tokens, and the needle is inserted at the depth, moved
back to just after the previous period token (``insert_needle``). Prompt (kvpress): the haystack in kvpress's
``context_wrapper`` is the compressible context, the question comes after it (``PromptEncoder`` adds the chat
layout). Score (kvpress's calculate_metrics): ROUGE of the needle against the prediction, one number of it per
``task.metric`` (default ``rouge-l/f``).

Parameters (conf/task/niah.yaml): ``data_dir``, ``context_lengths``, ``depths``, ``needle``, ``question``,
``answer_prefix``, ``max_new_tokens``, ``final_context_length_buffer``, ``context_wrapper``, ``metric``. Every
sample's meta holds ``depth`` (percent, as asked), ``context_length`` (its cell's length: the row's
``context_length``), ``needle_token_position`` and ``evidence`` (the needle's character span in ``context``).
docs/niah.md describes the grid, the samples of a cell and every difference from gkamradt's and kvpress's code.
"""
from __future__ import annotations

from tasks import register
from tasks.niah.metric import METRICS, kvpress_rouge, niah_score
from tasks.niah.task import NiahTask

register("niah", suite="niah")(NiahTask)  # a suite of one task: task=niah runs it

__all__ = ["NiahTask", "METRICS", "kvpress_rouge", "niah_score"]
