"""Official InfiniteBench prompts split into kvbench's parts, and the official middle truncation.

Prompts are src/eval_utils.py ``create_prompt`` (OpenBMB/InfiniteBench at 88b3daa): the family's template of
src/prompt.py filled with the record's fields (``prompt_fields``). kvbench splits the filled template at the
document: ``head`` is the template text before ``{context}``, ``tail`` the text after it, whose last line may be
the answer cue (``config.ANSWER_PREFIX``). Query-agnostic runs prefill and compress ``head + document`` before
the question part is seen. Two templates name the question *before* the document (math_find's ``{prefix}``,
code_run's ``{func}``): their head holds it, as in the official prompt.

Truncation is the open models' scripts' (src/eval_yarn_mistral.py, eval_yi_200k.py, eval_chatglm.py
``truncate_by_tokens``) on the whole filled prompt::

    tokens = tok.encode(input)                   # with the tokenizer's special tokens (a BOS counts)
    if len(tokens) > max_length:
        split = max_length // 2
        tokens = tokens[0:split] + tokens[-split:]
    return tok.decode(tokens, skip_special_tokens=True)

(one decode of the kept ids, unlike LongBench's two). eval_utils.py's own ``truncate_input`` (GPT-4's) keeps
``max_length // 2`` and ``-max_length // 2`` ids, one more for an odd length; kvbench uses the scripts' rule for
every family.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import KvbenchError
from tasks.infinitebench.config import ANSWER_PREFIX, TEMPLATES
from tasks.infinitebench.data import CODE_RUN_CALL, MATH_FIND_TARGET


def prompt_fields(task: str, record: dict) -> dict[str, str]:
    """The fields create_prompt fills the template with, ``{context}`` aside.

    claude2's longbook_qa_eng template names ``{input}``, which create_prompt does not pass (it raises KeyError
    there): it gets the question too."""
    if task == "code_run":
        func_call = CODE_RUN_CALL.findall(record["input"])[0]
        return {"func": func_call.split("(")[0], "func_call": func_call}
    if task in ("code_debug", "longbook_choice_eng"):
        fields = {f"OPTION_{letter}": option for letter, option in zip("ABCD", record["options"])}
        if task == "longbook_choice_eng":
            fields["question"] = record["input"]
        return fields
    if task in ("longbook_qa_eng", "longbook_qa_chn"):
        return {"question": record["input"], "input": record["input"]}
    if task in ("longdialogue_qa_eng", "longbook_sum_eng", "math_calc"):
        return {}
    if task == "math_find":
        target_number = MATH_FIND_TARGET.findall(record["input"])[0].lower()[:-3]
        return {"prefix": f"What is {target_number} in the following list?", "input": record["input"]}
    return {"input": record["input"]}  # passkey, number_string, kv_retrieval


@dataclass
class PromptParts:
    head: str  # template text before the document
    document: str  # the record's context
    tail: str  # template text after the document, answer prefix excluded (the question part)
    answer_prefix: str  # the cue the answer continues ("" for most templates)

    @property
    def text(self) -> str:
        """The official prompt (create_prompt's value)."""
        return self.head + self.document + self.tail + self.answer_prefix


def prompt_parts(family: str, task: str, record: dict) -> PromptParts:
    template = TEMPLATES[family][task]
    before, after = template.split("{context}")
    fields = prompt_fields(task, record)
    tail = after.format(**fields)
    prefix = ANSWER_PREFIX[family].get(task, "").format(**fields)
    return PromptParts(before.format(**fields), record["context"], tail[:len(tail) - len(prefix)], prefix)


def official_prompt(family: str, task: str, record: dict) -> str:
    """``template.format(context=..., **fields)`` in one piece (what the parts must join to)."""
    return TEMPLATES[family][task].format(context=record["context"], **prompt_fields(task, record))


def keep_middle_cut(ids: list[int], max_length: int) -> list[int]:
    """The ids truncate_by_tokens keeps: the first and the last ``max_length // 2``."""
    split = max_length // 2
    if split < 1:  # the official ids[-0:] would keep everything
        raise KvbenchError(f"InfiniteBench truncation budget {max_length} is too small (needs at least 2 tokens)")
    return list(ids[:split]) + list(ids[-split:])


@dataclass
class Truncation:
    text: str  # the prompt the model sees (before any chat template)
    truncated: bool
    n_tokens: int  # tokens of the untruncated prompt, special tokens included (the official count)
    kept_tokens: int  # tokens truncate_by_tokens kept
    first_half: str = ""  # decode of the kept head ids (where the cut is, when truncated)


def truncate(prompt: str, tokenizer, max_length: int) -> Truncation:
    """truncate_by_tokens(prompt, tokenizer, max_length)."""
    ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)
    if len(ids) <= max_length:
        return Truncation(prompt, False, len(ids), len(ids))
    kept = keep_middle_cut(ids, max_length)
    first = tokenizer.decode(kept[:max_length // 2], skip_special_tokens=True)
    return Truncation(tokenizer.decode(kept, skip_special_tokens=True), True, len(ids), len(kept), first)


def split_truncated(parts: PromptParts, trunc: Truncation) -> tuple[str, str, str, str]:
    """(context, question, answer prefix, how) of a truncated prompt.

    ``how`` is "question" when the prompt still ends with the whole question part and starts with the head (the
    cut fell inside the document: the usual case, which ``fixed_tokens`` makes sure of), else "cut": split where
    the kept head ids end (decode normalizations changed the question's text)."""
    text = trunc.text
    if not trunc.truncated:
        return parts.head + parts.document, parts.tail, parts.answer_prefix, "none"
    question = parts.tail + parts.answer_prefix
    if text.endswith(question) and text.startswith(parts.head) and len(text) - len(question) >= len(parts.head):
        return text[:len(text) - len(question)], parts.tail, parts.answer_prefix, "question"
    cut = 0
    for a, b in zip(text, trunc.first_half):
        if a != b:
            break
        cut += 1
    rest = text[cut:]
    prefix = parts.answer_prefix if parts.answer_prefix and rest.endswith(parts.answer_prefix) else ""
    return text[:cut], rest[:len(rest) - len(prefix)], prefix, "cut"


def fixed_tokens(parts: PromptParts, tokenizer) -> tuple[int, int]:
    """Tokens of the head (special tokens included) and of the question part: what the cut must not reach."""
    head = len(tokenizer(parts.head, add_special_tokens=True).input_ids)
    question = len(tokenizer(parts.tail + parts.answer_prefix, add_special_tokens=False).input_ids)
    return head, question
