"""Official LongBench prompts, middle truncation, and the context/question split.

Truncation is LongBench/pred.py ``get_pred`` (THUDM/LongBench at 2e00731)::

    tokenized_prompt = tokenizer(prompt, truncation=False, return_tensors="pt").input_ids[0]
    if len(tokenized_prompt) > max_length:
        half = int(max_length/2)
        prompt = tokenizer.decode(tokenized_prompt[:half], skip_special_tokens=True) \
            + tokenizer.decode(tokenized_prompt[-half:], skip_special_tokens=True)

i.e. the prompt is tokenized *with* the tokenizer's special tokens (a BOS counts in the first half), and
the two halves are decoded separately without special tokens. The chat template is applied afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import KvbenchError
from tasks.longbench.config import PROMPTS


def build_prompt(dataset: str, context: str, input: str) -> str:  # noqa: A002 - the official field name
    """The official prompt: ``dataset2prompt[dataset].format(**json_obj)``."""
    return PROMPTS[dataset].format(context=context, input=input)


def context_end(dataset: str, context: str) -> int:
    """Character offset in the untruncated prompt where the document(s) end (prefix + context)."""
    prefix = PROMPTS[dataset].split("{context}", 1)[0]
    return len(prefix) + len(context)


def middle_halves(ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """The token ids pred.py keeps: the first and the last ``int(max_length / 2)`` ids."""
    half = int(max_length / 2)
    if half < 1:  # pred.py would keep ids[-0:], the whole prompt: refuse instead
        raise KvbenchError(f"LongBench truncation budget {max_length} is too small (needs at least 2 tokens)")
    return list(ids[:half]), list(ids[-half:])


@dataclass
class Truncation:
    prompt: str  # the prompt the model sees (before any chat template)
    truncated: bool
    n_tokens: int  # tokens of the untruncated prompt, special tokens included (pred.py's count)
    head: str = ""  # decode of the first half (when truncated)
    tail: str = ""  # decode of the last half (when truncated)


def truncate(prompt: str, tokenizer, max_length: int) -> Truncation:
    ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)
    if len(ids) <= max_length:
        return Truncation(prompt, False, len(ids))
    first, last = middle_halves(ids, max_length)
    head = tokenizer.decode(first, skip_special_tokens=True)
    tail = tokenizer.decode(last, skip_special_tokens=True)
    return Truncation(head + tail, True, len(ids), head, tail)


def truncate_middle(prompt: str, tokenizer, max_length: int) -> str:
    """pred.py's middle truncation of ``prompt`` to ``max_length`` tokens of ``tokenizer``."""
    return truncate(prompt, tokenizer, max_length).prompt


def split_prompt(dataset: str, full_prompt: str, context: str, trunc: Truncation) -> int:
    """Where the (possibly truncated) prompt is split into Sample.context and Sample.question.

    Untruncated: right after the document(s). Truncated (the cut is normally inside the documents):
    1. the prompt still ends with everything that followed the documents -> split before it;
    2. else the first half still holds all of prefix + documents (the cut fell in the question) -> after it;
    3. else the literal template text after ``{context}`` (when distinctive) is found -> split before it;
    4. else at the cut (decode normalizations changed the text, e.g. clean_up_tokenization_spaces).
    """
    end = context_end(dataset, context)
    if not trunc.truncated:
        return end
    prompt, after, before = trunc.prompt, full_prompt[end:], full_prompt[:end]
    if after and prompt.endswith(after) and len(after) <= len(trunc.tail):
        return len(prompt) - len(after)
    if trunc.head.startswith(before):
        return len(before)
    marker = PROMPTS[dataset].split("{context}", 1)[1].split("{input}", 1)[0]
    if len(marker.strip()) >= 8:
        at = prompt.rfind(marker)
        if at >= len(trunc.head):
            return at
    if not after:
        return len(prompt)
    return len(trunc.head)
