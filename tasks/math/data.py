"""Reading MATH-500, AIME 2024 and AIME 2025 from their official files in ``task.data_dir`` (nothing is downloaded).

``locate`` finds a dataset's files: for each of its sources (``config.DATASETS``), in order, in the data_dir or in
its subfolder named after the hub repository; the first source whose every file pattern matches is read. JSON
lines (``.jsonl``) are read as they are; a ``.parquet`` file (the hub's own format for HuggingFaceH4/aime_2024,
Maxwell-Jia/AIME_2024, yentinglin/aime_2025) with pyarrow, which ``datasets`` installs, or, when a converted
``.jsonl`` of the same name is next to it, from that. Every record is checked before any prompt is built: a wrong
one is named by its file and line (or parquet row) and the key.

``load_problems`` gives one dict per problem: ``id`` (the sample id: ``<year>-<I|II>-<number>`` for an AIME
problem whose part and number are known, else the record's own id), ``problem``, ``answer`` (text: AIME answers
are integers in some copies) and ``meta`` (subject, level and unique_id for MATH-500; year, part, number for AIME;
the source repository and file).
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.errors import KvbenchError
from harness.paths import parse_jsonl, unreadable
from tasks.math.config import DATASETS, Dataset, Source

_AIME_ID = re.compile(r"^(\d{4})-(I{1,2})-(\d{1,2})$")  # Maxwell-Jia/AIME_2024's ID, e.g. "2024-II-4"
_AIME_URL = re.compile(r"(\d{4})_AIME_(I{1,2})_Problems/Problem_(\d{1,2})")  # AoPS wiki links (HuggingFaceH4)
_AIME_FILE = re.compile(r"-(I{1,2})$")  # opencompass/AIME2025's aime2025-I.jsonl / aime2025-II.jsonl


def hint(dataset: Dataset) -> str:
    urls = " or ".join(s.url for s in dataset.sources)
    return f"get it from {urls} and pass task.data_dir=<the dir holding it>"


def _shown(source: Source) -> str:
    names = [f"{p} (or .jsonl)" if p.endswith(".parquet") else p for p in source.files]
    return f"{' + '.join(names)} of {source.repo}"


def _matches(base: Path, patterns: tuple[str, ...]) -> list[Path] | None:
    """The files of ``base`` matching every pattern (a converted .jsonl preferred over a .parquet), else None."""
    out: list[Path] = []
    for pattern in patterns:
        variants = [pattern.removesuffix(".parquet") + ".jsonl", pattern] if pattern.endswith(".parquet") else [pattern]
        found: list[Path] = []
        for variant in variants:
            found = sorted(p for p in base.glob(variant) if p.is_file())
            if found:
                break
        if not found:
            return None
        out += found
    return out


def locate(dataset: Dataset, data_dir: str | os.PathLike | None, name: str) -> tuple[Source, list[Path]]:
    """The first source of ``dataset`` found in ``data_dir`` (or its subfolder named after the repository)."""
    wanted = "; ".join(_shown(s) for s in dataset.sources)
    if data_dir is None:
        raise KvbenchError(f"{name} reads {wanted} from task.data_dir, which is null (nothing is downloaded); "
                           f"{hint(dataset)}")
    root = Path(str(data_dir)).expanduser()
    for source in dataset.sources:
        for base in (root, root / source.folder):
            files = _matches(base, source.files)
            if files is not None:
                return source, files
    folders = sorted({f"{s.folder}/" for s in dataset.sources})
    where = f"its subfolder{'s' if len(folders) > 1 else ''} {', '.join(folders)}"
    raise KvbenchError(f"{name}: no {dataset.title} data in task.data_dir={str(data_dir)!r}: looked for {wanted}, "
                       f"there and in {where}; {hint(dataset)}")


# ---------------------------------------------------------------------------------------------------- reading
def _read_parquet(path: Path, dataset: Dataset) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException
    except ImportError:
        raise KvbenchError(f"{path}: a parquet file, and pyarrow (which reads it) is not installed: pip install "
                           f"pyarrow, or put next to it the same rows as JSON lines named {path.stem}.jsonl") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (ArrowException, OSError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise KvbenchError(f"{path}: not a readable parquet file ({first}); {hint(dataset)}") from None
    if not rows:
        raise KvbenchError(f"{path} holds no {dataset.title} records (no rows); {hint(dataset)}")
    return [(f"{path}: row {i}", row) for i, row in enumerate(rows, 1)]


def _read_jsonl(path: Path, dataset: Dataset) -> list[tuple[str, Any]]:
    try:
        with open(path, "rb") as f:  # bytes: a non-UTF-8 line is named with its number
            return parse_jsonl(f, str(path), dataset.title, lambda record, at: (at, record), hint(dataset))
    except OSError as err:
        raise unreadable(path, err, hint(dataset)) from None


def _text(record: dict, key: str, where: str, source: Source, integer_ok: bool = False) -> str:
    value = record[key]
    if integer_ok and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # Maxwell-Jia's and MathArena's AIME answers are int64
    if not isinstance(value, str):
        kinds = "a string or an integer" if integer_ok else "a string"
        raise KvbenchError(f"{where}: {key!r} is a {type(value).__name__}, not {kinds} ({source.repo} format)")
    if not value.strip():
        raise KvbenchError(f"{where}: {key!r} is empty")
    return value


def _aime_place(record: dict, source: Source, path: Path, index: int) -> tuple[int | None, str | None, int | None]:
    """(year, part, number) of an AIME record, from its ID, its AoPS url, its file name, or its problem_idx."""
    ident = record.get("ID")
    if isinstance(ident, str) and (m := _AIME_ID.match(ident.strip())):
        return int(m.group(1)), m.group(2), int(m.group(3))
    url = record.get("url")
    if isinstance(url, str) and (m := _AIME_URL.search(url)):
        return int(m.group(1)), m.group(2), int(m.group(3))
    year = record.get("year")
    year = int(year) if isinstance(year, (int, str)) and str(year).strip().isdigit() else None
    if m := _AIME_FILE.search(path.stem):  # opencompass: one file per part, problems in contest order
        return year, m.group(1), index
    number = record.get("problem_idx")
    return year, None, number if isinstance(number, int) and not isinstance(number, bool) else None


def _problem(dataset: Dataset, source: Source, where: str, record: Any, path: Path, index: int) -> dict:
    """One checked problem dict of a raw record (``index``: its 1-based position in its file)."""
    if not isinstance(record, dict):
        raise KvbenchError(f"{where}: a {type(record).__name__}, not a JSON object with the keys "
                           f"{', '.join(source.required)} ({source.repo} format)")
    for key in source.required:
        if key not in record:
            raise KvbenchError(f"{where}: no {key!r} ({source.repo} records have {', '.join(source.required)})")
    problem = _text(record, source.problem, where, source)
    answer = _text(record, source.answer, where, source, integer_ok=True).strip()
    own_id = next((record[k] for k in source.id_keys if record.get(k) is not None), None)
    if own_id is not None and (not isinstance(own_id, (str, int)) or isinstance(own_id, bool) or not str(own_id)):
        raise KvbenchError(f"{where}: the id {own_id!r} is not a non-empty string or an integer")
    meta: dict[str, Any] = {"source": source.repo, "file": path.name}
    if dataset.year is None:  # MATH-500
        level = record["level"]
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 5:
            raise KvbenchError(f"{where}: 'level' is {level!r}, not an integer 1..5 (MATH difficulty levels)")
        meta.update(subject=_text(record, "subject", where, source), level=level,
                    unique_id=_text(record, "unique_id", where, source))
        sample_id = meta["unique_id"]
    else:
        year, part, number = _aime_place(record, source, path, index)
        if year is not None and year != dataset.year:
            raise KvbenchError(f"{where}: a problem of AIME {year}, not of {dataset.title} (wrong file for this task)")
        meta.update(year=dataset.year, part=part, number=number)
        if own_id is not None:
            meta["record_id"] = own_id
        sample_id = (f"{dataset.year}-{part}-{number}" if part and number else
                     str(own_id) if own_id is not None else f"{path.name}:{index}")
    return {"id": sample_id, "problem": problem, "answer": answer, "meta": meta}


@lru_cache(maxsize=8)
def _load(short_name: str, source: Source, paths: tuple[str, ...], mtimes: tuple[int, ...]) -> tuple[dict, ...]:
    dataset = DATASETS[short_name]
    problems: list[dict] = []
    seen: dict[str, str] = {}
    for name in paths:
        path = Path(name)
        rows = _read_parquet(path, dataset) if path.suffix == ".parquet" else _read_jsonl(path, dataset)
        for index, (where, record) in enumerate(rows, 1):
            item = _problem(dataset, source, where, record, path, index)
            if item["id"] in seen:
                raise KvbenchError(f"{where}: the id {item['id']!r} of {seen[item['id']]} again (ids name the rows, "
                                   "so they must be unique)")
            seen[item["id"]] = where
            problems.append(item)
    return tuple(problems)


def load_problems(short_name: str, data_dir: str | os.PathLike | None, name: str) -> list[dict]:
    """The checked problems of ``short_name`` in file order (AIME2025: part I, then part II)."""
    source, files = locate(DATASETS[short_name], data_dir, name)
    try:
        mtimes = tuple(p.stat().st_mtime_ns for p in files)
    except OSError as err:
        raise unreadable(files[0], err, hint(DATASETS[short_name])) from None
    return [dict(p, meta=dict(p["meta"])) for p in _load(short_name, source, tuple(map(str, files)), mtimes)]
