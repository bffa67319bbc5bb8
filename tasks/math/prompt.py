"""The reasoning-model prompt of a math problem, split into kvbench's (context, question, answer prefix).

The user turn is the problem, a newline and the R1 / Qwen directive (``config.DIRECTIVE``)::

    {problem}
    Please reason step by step, and put your final answer within \\boxed{}.

With a chat template (``model.chat=true``) that text is the one user message, no system prompt (DeepSeek-R1's
usage recommendation), and nothing is added after the template's generation prompt. Without one the text is the
same user turn followed by ``config.RAW_ANSWER_CUE`` ("\\nSolution:"), so that the prompt ends where the solution
starts.

The whole user turn is the ``context`` and the ``question`` is empty. A math prompt is a few hundred tokens at most
and all of it is the task (there is no document apart from a question to withhold from a query-agnostic
compression), and the KV cache that grows is the reasoning's, decoded after the prompt. So both query modes
prefill the same text: query-agnostic runs leave out only the chat template's end of turn and assistant header
(or the answer cue), which come after the compression.
"""
from __future__ import annotations

from tasks.math.config import DIRECTIVE, RAW_ANSWER_CUE, THINK_OPEN


def user_turn(problem: str) -> str:
    """The text of the user turn: the problem (stripped, as Qwen2.5-Math's evaluation strips it) and the
    directive."""
    return f"{problem.strip()}\n{DIRECTIVE}"


def prompt_parts(problem: str, chat: bool) -> tuple[str, str, str]:
    """(context, question, answer_prefix) of a problem, for an encoder with (``chat``) or without a chat template."""
    return user_turn(problem), "", "" if chat else RAW_ANSWER_CUE


def opens_think(prompt_text: str) -> bool:
    """Whether the prompt itself opens the reasoning block: chat templates of R1-style models end their generation
    prompt with "<think>\\n", and the model then writes only the block's end."""
    return prompt_text.rstrip().endswith(THINK_OPEN)
