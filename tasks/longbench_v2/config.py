"""LongBench v2 facts: domains, the official prompt templates, generation lengths, where the data lives.

Source: THUDM/LongBench at 2e00731f8d0bff23dc4325161044d0ed8af94c1e (the v2 code is the repository root):

- ``TEMPLATES``  = prompts/0shot.txt, 0shot_cot.txt, 0shot_cot_ans.txt, verbatim (no final newline; the CoT
  prompts' "Let’s" has U+2019). tests/fixtures/longbench_v2/metric_cases.json records the official files'
  SHA-256, checked by the tests.
- ``MAX_NEW_TOKENS`` = pred.py ``get_pred``: 128 for the direct answer, 1024 for the CoT reasoning and 128 for
  the CoT answer call (kvbench's single CoT pass gets both: docs/longbench_v2.md).
- ``DOMAINS`` = the ``domain`` values of data.json (README "Data Format"; 175 / 125 / 81 / 39 / 50 / 33 questions,
  503 in all), with kvbench's short task names.
- ``DIFFICULTIES`` / ``LENGTHS`` = result.py's buckets (README: difficulty 'easy' or 'hard', length 'short',
  'medium' or 'long').
"""
from __future__ import annotations

OFFICIAL_REPO = "THUDM/LongBench"
OFFICIAL_COMMIT = "2e00731f8d0bff23dc4325161044d0ed8af94c1e"

# Where the official data lives (README "Load Data": load_dataset('THUDM/LongBench-v2', split='train') reads it).
HF_REPO = "THUDM/LongBench-v2"
DATA_FILE = "data.json"
DATA_URL = "https://huggingface.co/datasets/THUDM/LongBench-v2/resolve/main/data.json"

# short task name -> the record's ``domain``
DOMAINS: dict[str, str] = {
    "single_doc_qa": "Single-Document QA",
    "multi_doc_qa": "Multi-Document QA",
    "long_icl": "Long In-context Learning",
    "dialogue_history": "Long-dialogue History Understanding",
    "code_repo": "Code Repository Understanding",
    "structured_data": "Long Structured Data Understanding",
}

DIFFICULTIES: tuple[str, ...] = ("easy", "hard")
LENGTHS: tuple[str, ...] = ("short", "medium", "long")
CHOICES: tuple[str, ...] = ("A", "B", "C", "D")

TEMPLATES: dict[str, str] = {
    "0shot": (
        'Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n'
        'What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n'
        'Format your response as follows: "The correct answer is (insert answer here)".'
    ),
    "0shot_cot": (
        'Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n\n'
        'What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n'
        'Let\u2019s think step by step:'
    ),
    "0shot_cot_ans": (
        'Please read the following text and answer the questions below.\n\nThe text is too long and omitted here.\n\n'
        'What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n'
        'Let\u2019s think step by step: $COT$\n\n'
        'Based on the above, what is the single, most likely answer choice? Format your response as follows: '
        '"The correct answer is (insert answer here)".'
    ),
}

# Where the compressible part of a prompt ends: right after the document, before the question (kvpress's
# evaluation/benchmarks/longbenchv2/create_huggingface_dataset.py splits there too: context = "... </text>\n\n").
DOC_END = "\n</text>\n\n"
QUESTION_START = "What is the correct answer to this question: "

ANSWER_TOKENS = 128  # pred.py: query_llm(..., max_new_tokens=128) for the answer
COT_TOKENS = 1024  # pred.py: query_llm(..., max_new_tokens=1024) for the CoT reasoning
MAX_NEW_TOKENS: dict[str, int] = {"0shot": ANSWER_TOKENS, "0shot_cot": COT_TOKENS + ANSWER_TOKENS}
