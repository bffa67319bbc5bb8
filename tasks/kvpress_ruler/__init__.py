"""kvpress's RULER data (suite ``ruler_kvpress``): the fixed samples kvpress's leaderboard is scored on.

kvpress (NVIDIA/kvpress) evaluates its leaderboard on the Hugging Face dataset ``simonjegou/ruler``
(evaluation/evaluate_registry.py), config ``4096`` (evaluation/leaderboard.sh: ``--dataset ruler --data_dir
4096``), split ``test``, made by evaluation/benchmarks/ruler/create_huggingface_dataset.py from RULER's generator
(evaluation/benchmarks/ruler/generate.sh: tokenizer meta-llama/Meta-Llama-3.1-8B, ``base`` template, 500 samples
per task, lengths 4096 / 8192 / 16384). Nothing is downloaded here: ``task.data_dir`` is a local copy.

**Layout of ``task.data_dir``** (as the Hub repo stores a config): the directory holding the config's files,
``*.parquet`` (e.g. ``4096/test-00000-of-00001.parquet``) and/or ``*.jsonl`` (one JSON object per line), or the
dataset root with one such sub-directory per context length (``<data_dir>/<context_length>/`` is then used).
Every row has the columns of create_huggingface_dataset.py::

    context         str        the haystack (everything before the question; what kvpress compresses)
    question        str        the question (kvpress appends it after compression unless --query_aware)
    answer_prefix   str        e.g. "Answer:" / "The special magic ..." (starts the model's reply)
    answer          list[str]  the gold answers (RULER's "outputs")
    task            str        niah_single_1 ... qa_2 (RULER's 13 task names)
    max_new_tokens  int        RULER's tokens_to_generate for the task family (niah 128, vt 30, cwe 120,
                               fwe 50, qa 32)

Other columns are ignored; rows of tasks not asked for are skipped. ``task=ruler_kvpress`` runs the 13 tasks
``ruler_kvpress/<task>`` (``task.exclude`` leaves some out); each takes the rows of its task in file order (files
sorted by name), the first ``n_samples`` of them (``null``: all; kvpress's leaderboard uses all 500).

**Prompts** are kvpress's (kvpress/pipeline.py ``preprocess``): with the model's chat template (``model.chat``)
the context part is the template up to the end of the context and the question part is ``question`` + the rest
of the template + ``answer_prefix`` (``PromptEncoder``'s chat layout is that split); without one, the context is
BOS + context and the question part ``question + "\\n" + answer_prefix`` (kvpress's question suffix). Query-aware
runs (``query_aware=true``, kvpress ``--query_aware``) prefill the question with the context. The prompt is never
truncated (kvpress truncates only beyond the model's maximum); ``context_length`` is the longest prompt accepted,
so a chat template on top of 4096-token samples may need ``context_length=4224``.

**Score**: RULER's metric (tasks/ruler/metrics.py): ``string_match_part`` for qa_1 / qa_2, ``string_match_all``
for the others, after kvpress's post-processing (evaluation/benchmarks/ruler/calculate_metrics.py: strip, delete
the control characters \\x00-\\x1f, strip; RULER's own turns them into newlines). kvpress's task score is the mean
over samples x 100 and the leaderboard number the mean over the 13 tasks: the report's suite mean.
"""
from __future__ import annotations

import json
import math
import os
import re
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from harness.errors import KvbenchError
from harness.paths import read_text
from tasks import register
from tasks.base import PromptEncoder, Sample, Task
from tasks.ruler.metrics import string_match_all, string_match_part
from tasks.ruler.templates import TASK_NAMES

SUITE = "ruler_kvpress"
COLUMNS = ("context", "question", "answer_prefix", "answer", "task", "max_new_tokens")
HF_DATASET = "simonjegou/ruler"  # where kvpress reads it (evaluation/evaluate_registry.py); never fetched here
_CONTROL = re.compile(r"[\x00-\x1f]")
_HINT = (f"give task.data_dir=<a local copy of the {HF_DATASET} config, e.g. .../ruler/4096, with its *.parquet or "
         "*.jsonl files> (see tasks/kvpress_ruler/__init__.py for the layout)")


def postprocess_kvpress(prediction: str) -> str:
    """kvpress's RULER post-processing: strip, delete every control character \\x00-\\x1f, strip."""
    return _CONTROL.sub("", prediction.strip()).strip()


def data_files(data_dir: str | os.PathLike, context_length: int | None = None) -> list[Path]:
    """The ``*.parquet`` / ``*.jsonl`` files of ``data_dir`` (sorted by name), or of ``data_dir/<context_length>``
    when ``data_dir`` itself holds none."""
    root = Path(data_dir).expanduser()
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".parquet", ".jsonl"))
    if not files and context_length is not None and (root / str(context_length)).is_dir():
        return data_files(root / str(context_length))
    if not files:
        sub = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise KvbenchError(f"{SUITE}: task.data_dir={str(root)!r} holds no *.parquet or *.jsonl file"
                           + (f" (sub-directories: {', '.join(sub[:6])})" if sub else "") + f"; {_HINT}")
    return files


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a damaged file
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise KvbenchError(f"{path}: not a readable parquet file ({first[:160]}); {_HINT}") from None
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise KvbenchError(f"{path}: lacks column(s) {', '.join(missing)}; kvpress's RULER data has "
                               f"{', '.join(COLUMNS)}")
        return frame[list(COLUMNS)].to_dict("records")
    rows = []
    for i, line in enumerate(read_text(path, _HINT).splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as err:
            raise KvbenchError(f"{path}: line {i} is not valid JSON ({err.msg})") from None
        if row is not None and not isinstance(row, dict):
            raise KvbenchError(f"{path}: line {i} is a JSON {type(row).__name__}, not an object")
        rows += [row] if row is not None else []
    return rows


def _check_row(row: dict, where: str) -> dict:
    """One row in plain Python types, checked: the columns, strings, a non-empty list of string answers, a
    positive max_new_tokens."""
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise KvbenchError(f"{where} lacks {', '.join(missing)}; kvpress's RULER rows have {', '.join(COLUMNS)}")
    out: dict[str, Any] = {}
    for key in ("context", "question", "answer_prefix", "task"):
        if not isinstance(row[key], str):
            raise KvbenchError(f"{where}: {key} is a {type(row[key]).__name__}, not a string")
        out[key] = row[key]
    answer = row["answer"]
    if hasattr(answer, "tolist"):  # parquet list columns come back as numpy arrays
        answer = answer.tolist()
    if isinstance(answer, str):
        answer = [answer]
    if not isinstance(answer, (list, tuple)) or not answer or not all(isinstance(a, str) for a in answer):
        raise KvbenchError(f"{where}: answer must be a non-empty list of strings, not {answer!r:.80}")
    out["answer"] = list(answer)
    tokens = row["max_new_tokens"]
    if hasattr(tokens, "item"):  # a numpy scalar from parquet
        tokens = tokens.item()
    if isinstance(tokens, float) and math.isfinite(tokens) and tokens.is_integer():
        tokens = int(tokens)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise KvbenchError(f"{where}: max_new_tokens is {tokens!r}, not a positive integer")
    out["max_new_tokens"] = tokens
    return out


@lru_cache(maxsize=8)
def _load(files: tuple[str, ...], stamps: tuple[int, ...]) -> dict[str, tuple[dict, ...]]:
    by_task: dict[str, list[dict]] = {}
    for name in files:
        path = Path(name)
        for i, row in enumerate(_read_file(path), 1):
            checked = _check_row(row, f"{path} row {i}")
            checked["row"] = f"{path.name}:{i}"
            by_task.setdefault(checked["task"], []).append(checked)
    return {task: tuple(rows) for task, rows in by_task.items()}


def load_rows(data_dir: str | os.PathLike, context_length: int | None = None) -> dict[str, tuple[dict, ...]]:
    """``{task: rows}`` of the data under ``data_dir`` (cached per file set and modification times)."""
    files = data_files(data_dir, context_length)
    try:
        stamps = tuple(p.stat().st_mtime_ns for p in files)
    except OSError as err:
        raise KvbenchError(f"{SUITE}: cannot read {str(data_dir)!r} ({err.strerror or err})") from None
    return _load(tuple(str(p) for p in files), stamps)


class KvpressRulerTask(Task):
    """One RULER task of kvpress's fixed data (``ruler_kvpress/<task>``)."""

    reads_data = True
    finite = True  # fixed records: n_samples=None means all of them

    def __init__(self, short: str, data_dir: str | None = None, **params: Any):
        self.short = short
        self.name = f"{SUITE}/{short}"
        self.info = {"suite": SUITE, "category": "synthetic"}
        if params:
            raise KvbenchError(f"{self.name}: unknown task option(s) {', '.join(sorted(params))}; allowed: data_dir")
        super().__init__(data_dir=data_dir)

    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int | None, seed: int) -> list[Sample]:
        if self.data_dir is None:
            raise KvbenchError(f"{self.name} reads kvpress's RULER data from local files (nothing is downloaded); "
                               f"{_HINT}")
        rows = load_rows(self.data_dir, int(context_length)).get(self.short, ())
        if not rows:
            raise KvbenchError(f"{self.name}: task.data_dir={str(self.data_dir)!r} has no row of task "
                               f"{self.short!r}; leave it out with task.exclude=[{self.short}]")
        picked = rows if n_samples is None else rows[: int(n_samples)]
        suffix = "" if encoder.chat else "\n"  # kvpress's question suffix without a chat template
        return [Sample(sample_id=f"{self.short}-{i}", context=r["context"], question=r["question"] + suffix,
                       answers=list(r["answer"]), answer_prefix=r["answer_prefix"],
                       max_new_tokens=r["max_new_tokens"], meta={"task": self.short, "row": r["row"]})
                for i, r in enumerate(picked)]

    def score(self, prediction: str, sample: Sample) -> float:
        pred = postprocess_kvpress(prediction)
        metric = string_match_part if self.short.startswith("qa") else string_match_all
        return metric(pred, sample.answers)


for _name in TASK_NAMES:
    register(f"{SUITE}/{_name}", suite=SUITE)(partial(KvpressRulerTask, _name))

__all__ = ["KvpressRulerTask", "load_rows", "data_files", "postprocess_kvpress", "COLUMNS", "SUITE"]
