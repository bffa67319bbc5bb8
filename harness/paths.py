"""User-given input files: where they are looked up (one rule for all of them), and reading them so that a
missing, corrupt or incomplete file is one ``KvbenchError`` naming the file and what is wrong, never a traceback.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.errors import KvbenchError

REPO_ROOT = Path(__file__).resolve().parent.parent


def find_input(path: str | Path, usable: Callable[[Path], bool] = Path.exists) -> Path | None:
    """``path`` if absolute; else relative to the working dir, else to the repository (so the shipped
    ``harness/reference/...`` defaults work from any directory). The first candidate that is ``usable``,
    resolved; None when none is."""
    p = Path(str(path)).expanduser()
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]):
        if usable(candidate):
            return candidate.resolve()
    return None


def _then(hint: str) -> str:
    return f"; {hint}" if hint else ""


def unreadable(path: Path, err: OSError, hint: str = "") -> KvbenchError:
    """The error for a file the OS will not read (missing, a directory, no permission)."""
    return KvbenchError(f"{path}: cannot be read ({err.strerror or type(err).__name__}){_then(hint)}")


def not_utf8(where: str, err: UnicodeDecodeError, hint: str = "") -> KvbenchError:
    """The error for bytes that are not UTF-8 text; ``where`` is the file (or ``file:line``)."""
    bad = err.object[err.start:err.start + 1].hex()
    return KvbenchError(f"{where}: not UTF-8 text (byte 0x{bad} at offset {err.start}){_then(hint)}")


def yaml_position(err: Exception) -> str:
    """`` at line N`` of a YAML parse error that knows where it stopped, else empty."""
    mark = getattr(err, "problem_mark", None)  # PyYAML's MarkedYAMLError attribute
    return f" at line {mark.line + 1}" if mark is not None else ""


def read_text(path: str | Path, hint: str = "") -> str:
    """A UTF-8 text file's content. ``hint`` (what to do) ends the error message."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as err:
        raise unreadable(path, err, hint) from None
    except UnicodeDecodeError as err:
        raise not_utf8(str(path), err, hint) from None


def read_json(path: str | Path, hint: str = "") -> Any:
    """A JSON file's value (UTF-8); a file that cannot be read or parsed is a one-line error naming it."""
    text = read_text(path, hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise KvbenchError(f"{path}: malformed JSON ({err.msg} at line {err.lineno} column {err.colno})"
                           f"{_then(hint)}") from None


def read_json_object(path: str | Path, hint: str = "") -> dict:
    """``read_json`` of a file that must hold one JSON object (config files)."""
    value = read_json(path, hint)
    if not isinstance(value, dict):
        raise KvbenchError(f"{path}: a JSON object is needed, not a {type(value).__name__}{_then(hint)}")
    return value


@contextmanager
def open_safetensors(path: str | Path, hint: str = "") -> Iterator[Any]:
    """``safe_open`` of a safetensors file (torch tensors). Opening checks the header against the file size,
    so a truncated, empty or foreign file fails here, as does a tensor that cannot be read in the block."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except SafetensorError as err:
        raise KvbenchError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})"
                           f"{_then(hint)}") from None
    except OSError as err:
        raise unreadable(path, err, hint) from None


def read_safetensors(path: str | Path, hint: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """All tensors of a safetensors file and its metadata."""
    with open_safetensors(path, hint) as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def check_tensors(found: dict[str, Any], expected: dict[str, tuple[int, ...] | None], where: str, hint: str = "",
                  optional: tuple[str, ...] = ()) -> None:
    """One error for a tensor file whose tensors are not ``expected`` (name -> shape; None: any shape): the
    names it lacks, those it has in excess, and the shapes that differ. ``optional`` names may be absent."""
    missing = [k for k in expected if k not in found and k not in optional]
    extra = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} instead of {want}" for k, want in expected.items()
              if k in found and want is not None and tuple(found[k].shape) != tuple(want)]
    if len(shapes) > 3:  # one line: the first few say what is wrong
        shapes = shapes[:3] + [f"{len(shapes) - 3} more of another shape"]
    problems = ([f"lacks {', '.join(missing)}"] if missing else []) + \
               ([f"has unexpected {', '.join(extra)}"] if extra else []) + shapes
    if problems:
        raise KvbenchError(f"{where}: {'; '.join(problems)}{_then(hint)}")


def parse_jsonl(lines, where: str, suite: str, check, empty_hint: str) -> list:
    """Records of JSON lines (str, or bytes decoded as UTF-8), each passed through ``check(record, "<where>:<n>")``;
    blank lines are skipped, a bad one is named ``<where>:<line number>``, and no record at all is an error too (an
    empty or truncated download). ``suite`` names the data in the messages, ``empty_hint`` says where to get it."""
    records = []
    for lineno, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise not_utf8(f"{where}:{lineno}", err, f"{suite} files are UTF-8 JSON lines") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise KvbenchError(f"{where}:{lineno}: malformed JSON in {suite} data ({err.msg})") from None
        records.append(check(record, f"{where}:{lineno}"))
    if not records:
        raise KvbenchError(f"{where} holds no {suite} records (empty file); {empty_hint}")
    return records
