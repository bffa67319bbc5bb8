"""InfiniteBench (Zhang et al., ACL 2024) facts: task list, data files, generation lengths, prompt templates.

Source: OpenBMB/InfiniteBench (formerly xinrongzhang2022/InfiniteBench) at 88b3daa6989da2fbe0077170d7a3c84c25d5ae58:

- ``TASKS``          = src/compute_scores.py ``ALL_TASKS`` (the 12 tasks; the file names of src/eval_utils.py
  ``DATA_NAME_TO_PATH``: ``<task>.jsonl``, as on the Hugging Face dataset xinrongzhang2022/InfiniteBench).
- ``MAX_NEW_TOKENS`` = src/eval_utils.py ``DATA_NAME_TO_MAX_NEW_TOKENS``, verbatim (math_calc's 30000 included).
- ``TEMPLATES``      = src/prompt.py ``yarn_mistral_templates`` / ``gpt4_templates`` / ``claude2_templates``,
  verbatim (typos such as "funtion" included). src/eval_utils.py ``MODEL_TO_PROMPT_TEMPLATE`` gives
  yarn_mistral's to every open model it ran (yarn-mistral, yi-6b-200k, yi-34b-200k, chatglm3): kvbench's
  default. ``kimi_templates`` is not offered: it puts the book after the question in Kimi's own file syntax
  (``{file:{context}}``), which ``str.format`` cannot fill (its longbook_choice_eng and code_debug name fields
  create_prompt never passes).
- ``ANSWER_PREFIX``  = the last line (code_run: last sentence) of a template when it is the cue the answer
  continues ("The pass key is"): kvbench's ``Sample.answer_prefix`` (with a chat template it opens the
  assistant's reply). Joined, the parts are the official prompt byte for byte.
- ``CATEGORY`` / ``PAPER_NAME`` = the paper's Table 1 / README task table (Retrieve.PassKey, En.Sum, ...).
"""
from __future__ import annotations

TASKS: tuple[str, ...] = (
    "passkey", "number_string", "kv_retrieval", "longdialogue_qa_eng", "longbook_sum_eng", "longbook_choice_eng",
    "longbook_qa_eng", "longbook_qa_chn", "math_find", "math_calc", "code_run", "code_debug",
)
# Tasks kvbench also generates offline at any length when no data file is given (construct_synthetic_dataset.py).
SYNTHETIC: tuple[str, ...] = ("passkey", "number_string", "kv_retrieval")

HF_REPO = "xinrongzhang2022/InfiniteBench"
DATA_URL = "https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench/resolve/main/{task}.jsonl"

MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 6,
    "number_string": 12,
    "kv_retrieval": 50,
    "longbook_sum_eng": 1200,
    "longbook_choice_eng": 40,
    "longbook_qa_eng": 40,
    "longbook_qa_chn": 40,
    "longdialogue_qa_eng": 40,
    "math_find": 3,
    "math_calc": 30000,
    "code_run": 5,
    "code_debug": 5,
}

CATEGORY: dict[str, str] = {
    "passkey": "retrieval", "number_string": "retrieval", "kv_retrieval": "retrieval",
    "longbook_sum_eng": "novel", "longbook_choice_eng": "novel", "longbook_qa_eng": "novel", "longbook_qa_chn": "novel",
    "longdialogue_qa_eng": "dialogue", "math_find": "math", "math_calc": "math", "code_run": "code",
    "code_debug": "code",
}
PAPER_NAME: dict[str, str] = {
    "passkey": "Retrieve.PassKey", "number_string": "Retrieve.Number", "kv_retrieval": "Retrieve.KV",
    "longbook_sum_eng": "En.Sum", "longbook_choice_eng": "En.MC", "longbook_qa_eng": "En.QA",
    "longbook_qa_chn": "Zh.QA",
    "longdialogue_qa_eng": "En.Dia", "math_find": "Math.Find", "math_calc": "Math.Calc", "code_run": "Code.Run",
    "code_debug": "Code.Debug",
}
LANGUAGE: dict[str, str] = {t: ("zh" if t == "longbook_qa_chn" else "en") for t in TASKS}

# compute_scores.py get_score_one's per-task function, by kvbench's name for it (tasks/infinitebench/metrics.py)
METRIC: dict[str, str] = {
    "passkey": "first_int_match", "number_string": "first_int_match", "kv_retrieval": "kv_word_match",
    "longbook_sum_eng": "rouge_lsum", "longbook_choice_eng": "choice_match", "longbook_qa_eng": "qa_f1",
    "longbook_qa_chn": "qa_f1_zh_chars", "longdialogue_qa_eng": "dialogue_name_match",
    "math_find": "first_number_match",
    "math_calc": "prefix_match_ratio", "code_run": "last_int_match", "code_debug": "debug_option_match",
}

PROMPT_FAMILIES: tuple[str, ...] = ("yarn_mistral", "gpt4", "claude2")
DEFAULT_PROMPT_FAMILY = "yarn_mistral"

TEMPLATES: dict[str, dict[str, str]] = {
    'yarn_mistral': {
        'passkey': (
            'There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information.\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}\n'
            '\n'
            'The pass key is'
        ),
        'number_string': (
            'There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}\n'
            '\n'
            'The sequence of digits is'
        ),
        'kv_retrieval': (
            'Extract the value corresponding to the specified key in the JSON object below.\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}'
        ),
        'longbook_sum_eng': (
            'Summarize the book below.\n'
            '\n'
            '{context}\n'
            '\n'
            'Summary:'
        ),
        'longbook_choice_eng': (
            'Read the book and answer the question.\n'
            '\n'
            '{context}\n'
            '\n'
            'Question: {question}\n'
            'A. {OPTION_A}\n'
            'B. {OPTION_B}\n'
            'C. {OPTION_C}\n'
            'D. {OPTION_D}\n'
            '\n'
            'The letter of the correct answer is'
        ),
        'longbook_qa_eng': (
            'Read the book and answer the question. Be very concise in your answer.\n'
            '\n'
            '{context}\n'
            '\n'
            'Question: {question}\n'
            'Answer:'
        ),
        'longbook_qa_chn': (
            '阅读以下书籍然后回答问题。\n'
            '\n'
            '{context}\n'
            '\n'
            '问题：{question}\n'
            '答案：'
        ),
        'longdialogue_qa_eng': (
            'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", and you should try to guess who that character is.\n'
            '\n'
            '{context}\n'
            '\n'
            'The name that has been replaced with $$MASK$$ is likely'
        ),
        'math_find': (
            '{prefix}\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}'
        ),
        'math_calc': (
            'Let us calculate the intermediate values of an expression.\n'
            '\n'
            'Expression: 1 + 3 + 4\n'
            'Values: [1, 4, 8]\n'
            '\n'
            'Expression: 8 - 3 + 2 - 4\n'
            'Values: [8, 5, 7, 3]\n'
            '\n'
            'Expression: {context}\n'
            'Values:'
        ),
        'code_run': (
            'There is a function called {func} in the following Python code.\n'
            '\n'
            '{context}\n'
            '\n'
            'Please compute the exact value of {func_call}. The value of {func_call} is'
        ),
        'code_debug': (
            'Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it crash.\n'
            '\n'
            '{context}\n'
            '\n'
            'Options:\n'
            'A. {OPTION_A}\n'
            'B. {OPTION_B}\n'
            'C. {OPTION_C}\n'
            'D. {OPTION_D}\n'
            '\n'
            'The correct option is:'
        ),
    },
    'gpt4': {
        'passkey': (
            'There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}'
        ),
        'number_string': (
            'There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}'
        ),
        'kv_retrieval': (
            'Extract the value corresponding to the specified key in the JSON object below.\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}'
        ),
        'longbook_sum_eng': (
            'Summarize the following book.\n'
            '\n'
            '{context}'
        ),
        'longbook_choice_eng': (
            'Read the book and answer the question.\n'
            '\n'
            '{context}\n'
            '\n'
            'Question: {question}\n'
            '\n'
            "Only one of the following options is correct, tell me the answer using one single letter (A, B, C, or D). Don't say anything else.\n"
            'A. {OPTION_A}\n'
            'B. {OPTION_B}\n'
            'C. {OPTION_C}\n'
            'D. {OPTION_D}'
        ),
        'longbook_qa_eng': (
            'Read the book below and answer a question.\n'
            '\n'
            '{context}\n'
            '\n'
            'Question: {question}\n'
            '\n'
            'Be very concise.'
        ),
        'longbook_qa_chn': (
            '请根据以下书籍回答我的问题。\n'
            '\n'
            '{context}\n'
            '\n'
            '问题：{question}\n'
            '请尽量简短地回答。'
        ),
        'longdialogue_qa_eng': (
            'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", and you should try to guess who that character is.\n'
            '\n'
            'The dialogue:\n'
            '\n'
            '---\n'
            '\n'
            '{context}\n'
            '\n'
            '---\n'
            '\n'
            'End of dialogue.\n'
            '\n'
            'Which character is most likely "$$MASK$$"? Just say the name used by the scriptwriter (before the colon marks) of one single character and nothing else.'
        ),
        'math_find': (
            '{prefix}\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}'
        ),
        'math_calc': (
            'Compute the intermediate values in the following long expression.\n'
            '\n'
            '{context}'
        ),
        'code_run': (
            'Following is a set of Python functions. There is a function called named {func}.\n'
            '\n'
            '{context}\n'
            '\n'
            'Please give me the exact number of the return value of {func_call}. Be concise. Your response must end with the final returned value.'
        ),
        'code_debug': (
            'There is ONLY ONE function in the large project that is deliberately made to include an obvious error. Please find the function that contains the most obvious errors. I will give you four options to narrow your scope. You can inspect the options and think. Eventually, tell me the answer using one single letter (A, B, C, or D).\n'
            '\n'
            '{context}\n'
            '\n'
            'Which funtion has deliberate error?\n'
            'A. {OPTION_A}\n'
            'B. {OPTION_B}\n'
            'C. {OPTION_C}\n'
            'D. {OPTION_D}\n'
            '\n'
            'You should first find the functions in the options. Repeat their content, inspect through code, and at last give me your answer for the function that has the deliberate and obvious error in A, B, C, or D.'
        ),
    },
    'claude2': {
        'passkey': (
            'There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.\n'
            '\n'
            '{context}\n'
            '{input}\n'
            'The pass key is'
        ),
        'number_string': (
            'There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n'
            '\n'
            '{context}\n'
            '{input}\n'
            'The sequence of digits is'
        ),
        'kv_retrieval': (
            'There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n'
            '\n'
            '{context}\n'
            '{input}'
        ),
        'longbook_sum_eng': (
            'Summarize the following book.\n'
            '\n'
            '{context}'
        ),
        'longbook_choice_eng': (
            'Read the book and answer the question.\n'
            '\n'
            '{context}\n'
            '\n'
            'Question: {question}\n'
            '\n'
            "Only one of the following options is correct, tell me the answer using one single letter (A, B, C, or D). Don't say anything else.\n"
            'A. {OPTION_A}\n'
            'B. {OPTION_B}\n'
            'C. {OPTION_C}\n'
            'D. {OPTION_D}'
        ),
        'longbook_qa_eng': (
            'Read the novel below and answer a question:\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}\n'
            'Please answer as short as possible. The answer is: '
        ),
        'longbook_qa_chn': (
            '请根据以下书籍回答我的问题。\n'
            '\n'
            '{context}\n'
            '\n'
            '问题：{question}\n'
            '请尽量简短地回答。'
        ),
        'longdialogue_qa_eng': (
            'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", and you should try to guess who that character is.\n'
            '\n'
            'The dialogue:\n'
            '\n'
            '---\n'
            '\n'
            '{context}\n'
            '\n'
            '---\n'
            '\n'
            'End of dialogue.\n'
            '\n'
            'Which character is most likely "$$MASK$$"? Just say the name used by the scriptwriter (before the colon marks) of one single character and nothing else.'
        ),
        'math_find': (
            '{prefix}\n'
            '\n'
            '{context}\n'
            '\n'
            '{input}'
        ),
        'math_calc': (
            'Let us calculate the intermediate values of an expression.\n'
            'Expression: 1 + 3 + 4\n'
            'Values: [1, 4, 8]\n'
            '\n'
            'Expression: 8 - 3 + 2 - 4\n'
            'Values: [8, 5, 7, 3]\n'
            '\n'
            'Expression: {context}\n'
            'Values:'
        ),
        'code_run': (
            'In the file functions_module.py, there is a function called ${func}.\n'
            '\n'
            '\n'
            'Here is the content of functions_module.py:\n'
            '{context}\n'
            '\n'
            "Please give me the exact number of the return value of {func_call}. Your response should end with the sentence 'The return value is:'."
        ),
        'code_debug': (
            'There is ONLY ONE function in the large project that is deliberately made to include an obvious error. Please find the function that contains the most obvious errors. I will give you four options to narrow your scope. You can inspect through the options and think. Eventually, tell me the answer using one single letter (A, B, C, or D).\n'
            '\n'
            '{context}\n'
            '\n'
            'Which funtion has deliberate error?\n'
            'A. {OPTION_A}\n'
            'B. {OPTION_B}\n'
            'C. {OPTION_C}\n'
            'D. {OPTION_D}\n'
            '\n'
            'You should first find the functions in the options. Repeat their content, inspect through code, and at last give me your answer for the function that has the deliberate and obvious error in A, B, C, or D.'
        ),
    },
}

# The template's last line (code_run's: last sentence), when it is the cue the answer continues (filled like the
# template: code_run's names the call). Every other (family, task) has no answer prefix: the prompt ends with an instruction or with the
# record's own ``input`` (kv_retrieval's and math_find's end with "...is: ").
ANSWER_PREFIX: dict[str, dict[str, str]] = {
    "yarn_mistral": {
        "passkey": "The pass key is",
        "number_string": "The sequence of digits is",
        "longbook_sum_eng": "Summary:",
        "longbook_choice_eng": "The letter of the correct answer is",
        "longbook_qa_eng": "Answer:",
        "longbook_qa_chn": "答案：",
        "longdialogue_qa_eng": "The name that has been replaced with $$MASK$$ is likely",
        "math_calc": "Values:",
        "code_run": "The value of {func_call} is",
        "code_debug": "The correct option is:",
    },
    "gpt4": {},
    "claude2": {
        "passkey": "The pass key is",
        "number_string": "The sequence of digits is",
        "math_calc": "Values:",
    },
}
