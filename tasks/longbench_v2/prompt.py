"""The official LongBench v2 prompt, pred.py's middle truncation, and the context/question split.

Filling is pred.py ``get_pred`` (THUDM/LongBench at 2e00731)::

    prompt = template.replace('$DOC$', context.strip()).replace('$Q$', item['question'].strip())
                     .replace('$C_A$', item['choice_A'].strip()) ... .replace('$C_D$', item['choice_D'].strip())

a chain of global replacements, so a placeholder spelt inside the document or the question is replaced too, as
there. Truncation is pred.py ``query_llm`` (model in model2path, i.e. a Hugging Face tokenizer)::

    input_ids = tokenizer.encode(prompt)              # the tokenizer's special tokens included
    if len(input_ids) > max_len:
        input_ids = input_ids[:max_len//2] + input_ids[-max_len//2:]
        prompt = tokenizer.decode(input_ids, skip_special_tokens=True)

``-max_len//2`` is ``(-max_len)//2``: an odd budget keeps one token more at the end than at the start, and the
two halves are decoded together (LongBench v1 decodes them apart). The chat template is applied afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import KvbenchError
from tasks.longbench_v2.config import DOC_END, QUESTION_START, TEMPLATES

PLACEHOLDERS = (("$DOC$", "context"), ("$Q$", "question"), ("$C_A$", "choice_A"), ("$C_B$", "choice_B"),
                ("$C_C$", "choice_C"), ("$C_D$", "choice_D"))


def fill(template: str, record: dict, cot: str | None = None) -> str:
    """``template`` (a TEMPLATES value, or a part of one) filled with ``record`` as pred.py does; ``cot`` is the
    reasoning pasted into 0shot_cot_ans's ``$COT$`` (pred.py: the stripped first response, replaced last)."""
    text = template
    for placeholder, key in PLACEHOLDERS:
        text = text.replace(placeholder, record[key].strip())
    if cot is not None:
        text = text.replace("$COT$", cot)
    return text


def split_at_document_end(template: str) -> tuple[str, str]:
    """The template's part up to the end of the document (``...</text>\\n\\n``) and the part after it."""
    at = template.index(DOC_END) + len(DOC_END)
    return template[:at], template[at:]


def official_prompt(record: dict, template_name: str) -> tuple[str, str]:
    """The filled official prompt as (context part, question part); their concatenation is pred.py's prompt.

    Filling the two template parts apart gives the same text as filling the whole: no placeholder can match
    across the cut, which lies between two literal characters of the template ("\n" and "W"; tested)."""
    head, tail = split_at_document_end(TEMPLATES[template_name])
    return fill(head, record), fill(tail, record)


def cot_answer_prompt(record: dict, reasoning: str) -> str:
    """pred.py's second CoT call: 0shot_cot_ans.txt, the document omitted, the stripped reasoning pasted in. It
    never sees the document, so no KV cache is involved (kvbench does not run it: docs/longbench_v2.md)."""
    return fill(TEMPLATES["0shot_cot_ans"], record, cot=reasoning.strip())


def official_halves(ids: list[int], max_len: int) -> list[int]:
    """The ids pred.py keeps, literally ``input_ids[:max_len//2] + input_ids[-max_len//2:]``."""
    if max_len < 2:  # max_len 0 keeps ids[0:], everything; 1 keeps only the last id
        raise KvbenchError(f"LongBench v2 truncation budget {max_len} is too small (needs at least 2 tokens)")
    return list(ids[:max_len // 2]) + list(ids[-max_len // 2:])


@dataclass
class Truncation:
    prompt: str  # the prompt the model sees (before any chat template)
    truncated: bool
    n_tokens: int  # tokens of the untruncated prompt, special tokens included (pred.py's count)


def truncate(prompt: str, tokenizer, max_len: int) -> Truncation:
    """pred.py's middle truncation of ``prompt`` to ``max_len`` tokens of ``tokenizer``."""
    ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)  # tokenizer.encode(prompt)
    if len(ids) <= max_len:
        return Truncation(prompt, False, len(ids))
    return Truncation(tokenizer.decode(official_halves(ids, max_len), skip_special_tokens=True), True, len(ids))


def split_truncated(prompt: str, question: str) -> int | None:
    """Where a (possibly truncated) prompt's question part begins; None when the question did not survive.

    The prompt normally ends with the official question part (the cut falls in the document). A tokenizer whose
    decode cleans up spaces (``clean_up_tokenization_spaces``) may change its text, as it does in pred.py; then
    the split is after the last ``</text>`` that the question's opening line follows."""
    if prompt.endswith(question):
        return len(prompt) - len(question)
    at = prompt.rfind(DOC_END + QUESTION_START)
    return None if at < 0 else at + len(DOC_END)
