"""Reading the official InfiniteBench records: ``<data_dir>/<task>.jsonl`` as on the Hugging Face dataset.

The files are those of xinrongzhang2022/InfiniteBench (src/eval_utils.py ``DATA_NAME_TO_PATH``; fetched one by one by
the repository's scripts/download_dataset.sh). A record is one JSON object per line with ``context``, ``input``,
``answer`` and, for longbook_choice_eng and code_debug, the four ``options`` (``id`` when present names the sample).
Each record is checked before use: a missing or mistyped key is one error naming the file, the line and the key.
The label is eval_utils.py ``get_answer``'s: the record's answer, or ``[option text, letter]`` for the two
multiple-choice tasks.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.errors import KvbenchError
from harness.paths import parse_jsonl, unreadable
from tasks.infinitebench.config import DATA_URL, SYNTHETIC

# Keys create_prompt reads besides context and answer (longdialogue_qa_eng, longbook_sum_eng, math_calc and
# code_debug never read ``input``).
NEEDS_INPUT = frozenset({"passkey", "number_string", "kv_retrieval", "longbook_choice_eng", "longbook_qa_eng",
                         "longbook_qa_chn", "math_find", "code_run"})
NEEDS_OPTIONS = frozenset({"longbook_choice_eng", "code_debug"})
TEXT_ANSWER = frozenset({"longbook_sum_eng", "longbook_qa_eng", "longbook_qa_chn", "longdialogue_qa_eng", *SYNTHETIC})
CODE_RUN_CALL = re.compile(r"func_[0-9]+\(\-?[0-9]+\)")  # eval_utils.create_prompt's
MATH_FIND_TARGET = re.compile(r"The .+ of")  # eval_utils.create_prompt's


def data_hint(task: str) -> str:
    return (f"download it from {DATA_URL.format(task=task)} (all 12 files: scripts/download_dataset.sh of "
            "OpenBMB/InfiniteBench) and pass task.data_dir=<that dir>")


def data_file(task: str, data_dir: str | None, name: str) -> Path:
    """``<data_dir>/<task>.jsonl``; a one-line error when there is no data_dir or no such file."""
    file = f"{task}.jsonl"
    if data_dir is None:
        raise KvbenchError(f"{name} reads {file} from task.data_dir, which is null; {data_hint(task)}")
    path = Path(str(data_dir)).expanduser() / file
    if not path.is_file():
        raise KvbenchError(f"{name}: {file} not found in task.data_dir={str(data_dir)!r}; {data_hint(task)}")
    return path


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numeric_text(x: Any, integer: bool) -> bool:
    if isinstance(x, str):
        return bool(re.fullmatch(r"[+-]?\d+" if integer else r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", x.strip()))
    return isinstance(x, int) and not isinstance(x, bool) if integer else _is_number(x)


def _label(task: str, record: dict, where: str) -> Any:
    """The official label (get_answer) of a checked record; a one-line error when the answer cannot be one."""
    answer = record["answer"]
    items = answer if isinstance(answer, list) else [answer]
    if not items:
        raise KvbenchError(f"{where}: 'answer' is an empty list")
    if task in NEEDS_OPTIONS:
        options = record["options"]
        if len(items) == 2 and items[1] in ("A", "B", "C", "D"):  # already [option text, letter]
            return list(items)
        if len(items) != 1 or items[0] not in options:
            raise KvbenchError(f"{where}: 'answer' {answer!r} is not one of its 'options' (get_answer needs the "
                               "option's text, or [text, letter])")
        return [items[0], "ABCD"[options.index(items[0])]]
    if task in TEXT_ANSWER:
        if not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in items):
            raise KvbenchError(f"{where}: 'answer' must be a string or a list of strings")
        return answer
    if task == "math_calc":
        values = items[0] if isinstance(items[0], list) else items
        if not values or not all(_numeric_text(x, integer=True) for x in values):
            raise KvbenchError(f"{where}: 'answer' must be the list of the expression's integer intermediate values")
        return answer
    integer = task == "code_run"
    if not _numeric_text(items[0], integer=integer):
        raise KvbenchError(f"{where}: 'answer' must be {'an integer' if integer else 'a number'} (or a list "
                           f"holding one), not {answer!r}")
    return answer


def check_record(task: str, record: Any, where: str) -> dict:
    """``record`` with its official label under ``"_label"``; a one-line error naming the bad key otherwise."""
    if not isinstance(record, dict):
        raise KvbenchError(f"{where}: malformed InfiniteBench record (a JSON object is needed, not a "
                           f"{type(record).__name__})")
    needed = ["context", "answer"] + (["input"] if task in NEEDS_INPUT else []) + \
        (["options"] if task in NEEDS_OPTIONS else [])
    missing = [k for k in needed if k not in record]
    if missing:
        raise KvbenchError(f"{where}: malformed InfiniteBench record: no {', '.join(repr(k) for k in missing)}, "
                           f"which {task} needs")
    wrong = [k for k in ("context", "input") if k in needed and not isinstance(record[k], str)]
    if wrong:
        raise KvbenchError(f"{where}: malformed InfiniteBench record: {', '.join(repr(k) for k in wrong)} must be "
                           "a string")
    if task in NEEDS_OPTIONS:
        options = record["options"]
        if not (isinstance(options, list) and len(options) == 4 and all(isinstance(o, str) for o in options)):
            raise KvbenchError(f"{where}: malformed InfiniteBench record: 'options' must be a list of 4 strings "
                               "(options A-D)")
    if task == "code_run" and not CODE_RUN_CALL.search(record["input"]):
        raise KvbenchError(f"{where}: 'input' names no call func_<n>(<x>), which the code_run prompt needs")
    if task == "math_find" and not MATH_FIND_TARGET.search(record["input"]):
        raise KvbenchError(f"{where}: 'input' has no \"The ... of\" naming the number asked for, which the "
                           "math_find prompt needs")
    return {**record, "_label": _label(task, record, where)}


def parse_lines(task: str, lines, where: str) -> list[dict]:
    """Checked records of jsonl lines (``harness.paths.parse_jsonl``, as compute_scores.py's iter_jsonl skips
    blank lines); a bad one is named ``<where>:<line number>``."""
    return parse_jsonl(lines, where, "InfiniteBench", lambda record, at: check_record(task, record, at),
                       data_hint(task))


@lru_cache(maxsize=16)
def _read(task: str, path: str, mtime_ns: int) -> tuple[dict, ...]:
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line is named with its number
        return tuple(parse_lines(task, f, path))


def load_records(task: str, path: Path) -> list[dict]:
    """The checked records of one official file (cached while the file is unchanged)."""
    try:
        return list(_read(task, str(path), path.stat().st_mtime_ns))
    except OSError as err:
        raise unreadable(path, err, data_hint(task)) from None
