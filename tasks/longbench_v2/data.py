"""Loading the official LongBench v2 records: ``<data_dir>/data.json`` or the Hugging Face Hub.

data.json (the hub dataset THUDM/LongBench-v2's only file) is one JSON list of records with the keys pred.py
reads: _id, domain, sub_domain, difficulty, length, question, choice_A..choice_D, answer, context. Every record
is checked before any prompt is built: a wrong one is named by its position and _id, and by the key.

Without ``data_dir`` and with the network allowed (``HF_HUB_OFFLINE`` not "1"), the same file is downloaded with
``huggingface_hub.hf_hub_download`` (what ``load_dataset('THUDM/LongBench-v2', split='train')`` reads).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from harness.errors import KvbenchError
from harness.paths import read_json
from tasks.longbench.data import network_allowed
from tasks.longbench_v2.config import CHOICES, DATA_FILE, DATA_URL, DIFFICULTIES, DOMAINS, HF_REPO, LENGTHS

TEXT_KEYS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C",
             "choice_D", "answer", "context")
ALLOWED = {"domain": tuple(DOMAINS.values()), "difficulty": DIFFICULTIES, "length": LENGTHS, "answer": CHOICES}


def hint() -> str:
    return f"get the official file from {DATA_URL} and pass task.data_dir=<the dir holding it>"


def check_record(record, where: str, index: int) -> dict:
    """``record`` if it has every key as a string with an allowed value; else one line naming record and key."""
    if not isinstance(record, dict):
        raise KvbenchError(f"{where}: record {index} is a {type(record).__name__}, not a JSON object with the keys "
                           f"{', '.join(TEXT_KEYS)}")
    name = f"record {index} (_id {record.get('_id')!r})" if isinstance(record.get("_id"), str) else f"record {index}"
    for key in TEXT_KEYS:
        if key not in record:
            raise KvbenchError(f"{where}: {name} has no {key!r} (LongBench v2 records have {', '.join(TEXT_KEYS)})")
        if not isinstance(record[key], str):
            raise KvbenchError(f"{where}: {name}: {key!r} is a {type(record[key]).__name__}, not a string")
    for key, allowed in ALLOWED.items():
        if record[key] not in allowed:
            raise KvbenchError(f"{where}: {name}: {key}={record[key]!r} is not allowed; allowed: {', '.join(allowed)}")
    if not record["_id"]:
        raise KvbenchError(f"{where}: {name}: '_id' is empty")
    return record


def parse_records(value, where: str) -> tuple[dict, ...]:
    """The checked records of a parsed data.json (a non-empty list; every _id once)."""
    if not isinstance(value, list):
        raise KvbenchError(f"{where}: a JSON list of LongBench v2 records is needed, not a {type(value).__name__}; "
                           f"{hint()}")
    if not value:
        raise KvbenchError(f"{where} holds no LongBench v2 records (an empty list); {hint()}")
    records = tuple(check_record(r, where, i) for i, r in enumerate(value))
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r["_id"] in seen:
            raise KvbenchError(f"{where}: record {i} has the _id {r['_id']!r} of record {seen[r['_id']]} "
                               "(ids name the rows, so they must be unique)")
        seen[r["_id"]] = i
    return records


@lru_cache(maxsize=2)
def _read(path: str, mtime_ns: int) -> tuple[dict, ...]:
    return parse_records(read_json(path, hint()), path)  # one parse for every domain's task


def read_data(path: str | Path) -> tuple[dict, ...]:
    path = Path(path)
    return _read(str(path), path.stat().st_mtime_ns)


def data_path(data_dir: str | os.PathLike | None) -> Path:
    """Where data.json is: in ``data_dir``, else downloaded from the Hub when the network is allowed."""
    if data_dir is not None:
        path = Path(data_dir).expanduser() / DATA_FILE
        if not path.is_file():
            raise KvbenchError(f"LongBench v2 data file {DATA_FILE} not found in {str(Path(data_dir))!r}; {hint()}")
        return path
    if not network_allowed():
        raise KvbenchError(f"LongBench v2 needs {DATA_FILE}: task.data_dir is null and HF_HUB_OFFLINE=1 forbids "
                           f"downloading {HF_REPO}; {hint()}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(HF_REPO, DATA_FILE, repo_type="dataset"))
    except Exception as err:  # noqa: BLE001 - any Hub failure becomes one actionable line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise KvbenchError(f"could not download {DATA_FILE} of {HF_REPO} ({first[:200]}); {hint()}") from None


def load_records(data_dir: str | os.PathLike | None, domain: str | None = None) -> list[dict]:
    """The records of data.json in file order; only those of ``domain`` (the record's value) when given."""
    records = read_data(data_path(data_dir))
    return [r for r in records if domain is None or r["domain"] == domain]
