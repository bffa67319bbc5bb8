"""Durable outputs: rows are appended one JSON line at a time with flush + fsync; whole files are written to a
temporary file and renamed into place. A run killed at any moment leaves at worst a torn last line, which
``read_rows`` drops (and ``RowStore`` cuts off) instead of parsing it as data.

Every file is created with the user's umask (``tempfile.mkstemp`` alone would make it 0600), a full disk or a
read-only directory is a one-line ``KvbenchError`` naming the path, and a row key is never stored twice: the
store skips keys already written and ``read_rows`` keeps the first row of a key that a file holds twice.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from harness.errors import KvbenchError

ROW_KEY = ("task", "sample_id", "method", "keep_ratio")


def _umask() -> int:
    # os.umask can only be read by setting it; put it straight back (single-threaded at this point of a write).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def os_error(err: OSError, path: str | Path) -> KvbenchError:
    """A one-line error for a failed write: a full disk, a quota, a read-only or missing directory."""
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}.get(err.errno)
    return KvbenchError(f"cannot write {str(path)!r}: {reason or err.strerror or err}")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name (matplotlib's savefig); renamed onto
    ``path`` only when the block finishes, so a kill never leaves a partial file under the final name.
    ``suffix`` keeps the extension writers infer the format from."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
        os.close(fd)
    except OSError as err:
        raise os_error(err, path) from None
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise os_error(err, path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save(path: str | Path, save: Callable[[Path], None]) -> None:
    """``save(tmp_path)`` then rename: for writers of their own (torch, safetensors, matplotlib)."""
    with atomic_path(path) as tmp:
        save(tmp)


def row_key(row: dict) -> tuple:
    return tuple(round(float(row[k]), 6) if k == "keep_ratio" else row[k] for k in ROW_KEY)


def read_rows(path: str | Path, dedupe: bool = True) -> tuple[list[dict], int]:
    """Rows of a jsonl file and the byte length of its valid prefix.

    Only a final line without its newline can be torn by a kill; it is dropped. Anything else that is not a
    JSON object on one UTF-8 line is corruption, reported with the file and line number. With ``dedupe``, a row
    whose key (task, sample_id, method, keep_ratio) appeared earlier in the file is dropped: the first one
    written is the one a resumed run skipped on, so reports never count a key twice.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KvbenchError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    rows: list[dict] = []
    seen: set[tuple] = set()
    valid = 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        complete = lineno < len(lines)  # the last element follows the final newline (empty if the file is whole)
        if not raw.strip():
            if complete:
                valid += len(raw) + 1
            continue
        if not complete:
            break  # torn last line: written without its newline, never data
        where = f"{path}: line {lineno}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise KvbenchError(f"{where} is not UTF-8 text; fix or remove that line") from None
        except json.JSONDecodeError:
            raise KvbenchError(f"{where} is not valid JSON; fix or remove that line") from None
        if not isinstance(row, dict):
            raise KvbenchError(f"{where} is a JSON {type(row).__name__}, not a row object; fix or remove that line")
        missing = [k for k in ROW_KEY if k not in row]
        if missing:
            raise KvbenchError(f"{where} is a row without {', '.join(missing)}; fix or remove that line")
        try:
            key = row_key(row)
            hash(key)
        except (TypeError, ValueError):
            raise KvbenchError(f"{where} has a malformed row key ({', '.join(ROW_KEY)}); fix or remove that line") from None
        if dedupe and key in seen:
            valid += len(raw) + 1
            continue
        seen.add(key)
        rows.append(row)
        valid += len(raw) + 1
    return rows, valid


class RowStore:
    """Append-only ``predictions.jsonl`` with resume: knows which row keys are already written."""

    KEY = ROW_KEY

    def __init__(self, path: str | Path):
        self.path = Path(path)
        rows, valid = read_rows(self.path)
        if self.path.exists() and self.path.stat().st_size != valid:
            try:
                with open(self.path, "r+b") as fh:  # cut the torn tail so appends start on a clean line
                    fh.truncate(valid)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as err:
                raise os_error(err, self.path) from None
        self.rows = rows
        self.done = {self.key(r) for r in rows}

    @classmethod
    def key(cls, row: dict) -> tuple:
        return row_key(row)

    def append(self, rows: Iterable[dict]) -> None:
        fresh: list[dict] = []
        for r in rows:  # a key already written, or twice in this batch, is written once
            k = self.key(r)
            if k not in self.done and all(self.key(f) != k for f in fresh):
                fresh.append(r)
        if not fresh:
            return
        payload = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in fresh).encode("utf-8")
        try:
            with open(self.path, "ab") as fh:
                start = fh.tell()
                try:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
                except OSError:
                    # A full disk mid-write: cut back to the last whole row, so the file stays resumable.
                    with contextlib.suppress(OSError):
                        fh.truncate(start)
                    raise
        except OSError as err:
            raise os_error(err, self.path) from None
        self.rows.extend(fresh)
        self.done.update(self.key(r) for r in fresh)
