"""Loading the official LongBench records: ``<data_dir>/<name>.jsonl`` or the Hugging Face Hub.

``name`` is the dataset (``narrativeqa``) or its LongBench-E subset (``qasper_e``), as in the official
data.zip (``data/<name>.jsonl``) and the Hub configs of ``THUDM/LongBench``. Fields used: input, context,
answers, length, dataset, language, all_classes, _id.

Without ``data_dir`` and with the network allowed (``HF_HUB_OFFLINE`` not "1"): ``datasets.load_dataset(
"THUDM/LongBench", name, split="test")`` as the official pred.py does; if that fails (datasets >= 4 no longer
runs the repository's loading script), the same records are read from the repository's official data.zip.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.errors import KvbenchError
from harness.paths import parse_jsonl, unreadable
from tasks.longbench.config import DATA_ZIP_URL, HF_REPO

REQUIRED = ("input", "context", "answers")


def _hint() -> str:
    return f"get the official data from {DATA_ZIP_URL} (unzip; pass task.data_dir=<dir>/data)"


def _check(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise KvbenchError(f"{where}: malformed LongBench record (a JSON object is needed, not a {type(record).__name__})")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise KvbenchError(f"{where}: malformed LongBench record (missing {', '.join(missing)})")
    if not isinstance(record["answers"], list):
        raise KvbenchError(f"{where}: malformed LongBench record ('answers' must be a list)")
    wrong = [k for k in ("input", "context") if not isinstance(record[k], str)]
    if record.get("all_classes") is not None and not isinstance(record["all_classes"], list):
        wrong.append("all_classes")
    if record.get("length") is not None and (isinstance(record["length"], bool)
                                             or not isinstance(record["length"], (int, float))):
        wrong.append("length")
    if wrong:
        raise KvbenchError(f"{where}: malformed LongBench record ({', '.join(repr(k) for k in wrong)} of the wrong "
                           "type: input and context are strings, all_classes a list, length a number)")
    return record


def parse_lines(lines, where: str) -> list[dict]:
    """Checked records from jsonl lines (``harness.paths.parse_jsonl``)."""
    return parse_jsonl(lines, where, "LongBench", _check, _hint())


@lru_cache(maxsize=8)
def _read_jsonl(path: str, mtime_ns: int) -> tuple[dict, ...]:
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line is named with its number
        return tuple(parse_lines(f, path))


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of one official jsonl file; a malformed line is named by file and line number."""
    path = Path(path)
    try:
        return list(_read_jsonl(str(path), path.stat().st_mtime_ns))
    except OSError as err:
        raise unreadable(path, err, _hint()) from None


def network_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") != "1"


def load_records(name: str, data_dir: str | os.PathLike | None) -> list[dict]:
    """Records of ``name`` ('trec' or 'trec_e'): from data_dir, else from the Hub when the network is allowed."""
    if data_dir is not None:
        path = Path(data_dir) / f"{name}.jsonl"
        if not path.is_file():
            raise KvbenchError(f"LongBench data file {str(path)!r} not found; {_hint()}")
        return read_jsonl(path)
    if not network_allowed():
        raise KvbenchError(
            f"LongBench needs {name}.jsonl: task.data_dir is null and HF_HUB_OFFLINE=1 forbids downloading "
            f"{HF_REPO}; {_hint()}"
        )
    try:
        from datasets import load_dataset

        data = load_dataset(HF_REPO, name, split="test")
        return [_check(dict(r), f"{HF_REPO}/{name} row {i}") for i, r in enumerate(data)]
    except KvbenchError:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. datasets>=4 no longer runs the repo's loading script
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
    try:  # the same files, from the official data.zip of the dataset repo
        return _from_data_zip(name)
    except KvbenchError:
        raise
    except Exception as err:  # noqa: BLE001 - any Hub failure becomes one actionable line
        second = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise KvbenchError(f"could not load {HF_REPO} config {name!r} from the Hub (datasets: {first[:150]}; "
                           f"data.zip: {second[:150]}); {_hint()}") from None


@lru_cache(maxsize=32)
def _zip_records(name: str) -> tuple[dict, ...]:
    import zipfile

    from huggingface_hub import hf_hub_download

    path = hf_hub_download(HF_REPO, "data.zip", repo_type="dataset")
    member = f"data/{name}.jsonl"
    with zipfile.ZipFile(path) as zf:
        text = zf.read(member).decode("utf-8")
    return tuple(parse_lines(text.splitlines(), f"{path}!{member}"))


def _from_data_zip(name: str) -> list[dict]:
    return list(_zip_records(name))
