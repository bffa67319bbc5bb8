"""RULER's prompt facts: templates, answer prefixes, generation budgets, needle and noise formats.

Every string below is a fact taken from NVIDIA/RULER (Apache-2.0):
  - scripts/data/synthetic/constants.py  (templates, answer prefixes, tokens_to_generate)
  - scripts/synthetic.yaml               (the 13 task configurations)
  - scripts/data/synthetic/niah.py       (needle format, noise haystack, DEPTHS grid, singular rewrite)
  - scripts/data/synthetic/qa.py         (document format)
The official full prompt of a task is ``template.format(...) + answer_prefix`` (prepare.py with the
``base`` model template). We split it at the ``{context}`` slot: ``context`` is everything up to and
including the haystack, ``question`` the rest of the template, then the answer prefix.
"""
from __future__ import annotations

# scripts/data/synthetic/constants.py :: TASKS
BASE = {
    "niah": {
        "tokens_to_generate": 128,
        "template": (
            "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
        ),
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above."
        ),
        "answer_prefix": (
            " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
            "are assigned the value {query}, they are: "
        ),
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\n"
            "Question: What are the 10 most common words in the above list?"
        ),
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": (
            "Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\n"
            "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?"
        ),
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": (
            "Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nThe following are given documents.\n\n{context}\n\n"
            "Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nQuestion: {query}"
        ),
        "answer_prefix": " Answer:",
    },
}

# scripts/synthetic.yaml: the 13 tasks (generator + arguments)
CONFIGS: dict[str, dict] = {
    "niah_single_1": {"task": "niah", "type_haystack": "noise", "type_needle_k": "words", "type_needle_v": "numbers",
                      "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_single_2": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                      "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_single_3": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "uuids",
                      "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_multikey_1": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                        "num_needle_k": 4, "num_needle_v": 1, "num_needle_q": 1},
    "niah_multikey_2": {"task": "niah", "type_haystack": "needle", "type_needle_k": "words", "type_needle_v": "numbers",
                        "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_multikey_3": {"task": "niah", "type_haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids",
                        "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_multivalue": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                        "num_needle_k": 1, "num_needle_v": 4, "num_needle_q": 1},
    "niah_multiquery": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                        "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 4},
    "vt": {"task": "variable_tracking", "type_haystack": "noise", "num_chains": 1, "num_hops": 4},
    "cwe": {"task": "common_words_extraction", "freq_cw": 30, "freq_ucw": 3, "num_cw": 10},
    "fwe": {"task": "freq_words_extraction", "alpha": 2.0},
    "qa_1": {"task": "qa", "dataset": "squad"},
    "qa_2": {"task": "qa", "dataset": "hotpotqa"},
}

TASK_NAMES = list(CONFIGS)  # official order

# scripts/data/synthetic/niah.py
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int), written out (round half to even)
DEPTHS = [round(i * 100 / 39) for i in range(40)]

# scripts/data/synthetic/qa.py
DOCUMENT_PROMPT = "Document {i}:\n{document}"


def split_template(task: str) -> tuple[str, str, str]:
    """(head, tail, answer_prefix): the template before and after ``{context}``, and the answer prefix."""
    base = BASE[task]
    head, tail = base["template"].split("{context}")
    return head, tail, base["answer_prefix"]


def singularize(text: str) -> str:
    """niah.py's rewrite when exactly one value is asked for (applied to template and answer prefix)."""
    return (text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer"))


# ----------------------------------------------------------------------------------------------- prompt text
# RULER's niah and variable-tracking prompt text is built here only: by tasks/ruler's generators, by the reference
# model's training data (harness/reference/data.py, its own randomness) and by kvbench-train's synthetic prompts
# (harness/train.py, data.source=synthetic).
def needle_sentence(type_needle_v: str, key: str, value: str) -> str:
    """niah.py's needle sentence: ``One of the special magic numbers for <key> is: <value>.``"""
    return NEEDLE.format(type_needle_v=type_needle_v, key=key, value=value)


def join_items(items: list[str]) -> str:
    """niah.py's list of queried keys: ``a``, ``a, and b``, ``a, b, and c``."""
    return ", ".join(items[:-1]) + ", and " + items[-1] if len(items) > 1 else items[0]


def niah_prompt(type_needle_v: str, queries: list[str], singular: bool) -> tuple[str, str, str]:
    """niah.py's prompt around the haystack, formatted: (head before it, question after it, answer prefix).

    ``singular``: exactly one value is asked for (num_needle_q x num_needle_v == 1); niah.py then rewrites the
    template and the prefix in the singular and drops the type's final s (``number``)."""
    head, tail, prefix = split_template("niah")
    shown = type_needle_v
    if singular:
        head, tail, prefix = singularize(head), singularize(tail), singularize(prefix)
        shown = type_needle_v[:-1]
    query = join_items(queries)
    return (head.format(type_needle_v=shown), tail.format(type_needle_v=shown, query=query),
            prefix.format(type_needle_v=shown, query=query))


def vt_statements(names: list[str], value: str | int) -> list[str]:
    """variable_tracking.py's chain, one statement per name: ``VAR A = 12345``, ``VAR B = VAR A `` (RULER's
    trailing space), ..."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(len(names) - 1)]


def vt_prompt(value: str, num_v: int) -> tuple[str, str, str]:
    """variable_tracking.py's prompt around the haystack, formatted: (head, question, answer prefix) for the
    chain of ``num_v`` variables assigned ``value``."""
    head, tail, prefix = split_template("variable_tracking")
    return head, tail.format(query=value), prefix.format(query=value, num_v=num_v)
