"""kvbench's Hydra configs (``config.yaml``, ``train.yaml`` and the groups ``model/``, ``method/``, ``task/``,
``paper/``, ``paper_model/``), a package so that an installed kvbench finds them wherever it runs.

``CONF_DIR`` is the one place every command and the library read the shipped configs from (never the current
directory). A user adds config dirs of their own (their methods, tasks, models) with ``kvbench --config-dir DIR``,
``kvbench hydra.searchpath=[file://DIR]`` or ``kvbench.add_config_dir(DIR)``: ``search_path()`` lists them after
the shipped dir, and a name is looked up there in that order. A user dir adds configs; it may not replace a
shipped one (a file of the same group and name is refused: give yours its own name).
"""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Iterable, Iterator

CONF_DIR = Path(__file__).resolve().parent
_USER_DIRS: list[Path] = []


def _error(message: str) -> Exception:
    from harness.errors import KvbenchError

    return KvbenchError(message)


def _configs(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.yaml")}


def resolve_dir(entry: str | Path) -> Path:
    """A config dir as a directory: a path, ``file://<path>`` or ``pkg://<package>`` (Hydra's spellings
    of a search path entry)."""
    text = str(entry)
    if text.startswith("pkg://"):
        module = text[len("pkg://"):].strip("/").replace("/", ".")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise _error(f"config dir {text!r}: no package {module!r} to read configs from")
        path = Path(list(spec.submodule_search_locations)[0])
    else:
        path = Path(text[len("file://"):] if text.startswith("file://") else text)
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise _error(f"config dir {text!r} is not an existing directory")
    return path


def add_dir(entry: str | Path) -> Path:
    """Add a user config dir (after the shipped configs and the dirs added before); returns it resolved. A dir
    holding a config of the same group and name as a shipped one is refused (it would be silently ignored)."""
    path = resolve_dir(entry)
    if path == CONF_DIR or path in _USER_DIRS:
        return path
    clash = sorted(_configs(path) & _configs(CONF_DIR))
    if clash:
        raise _error(f"config dir {str(entry)!r} holds {clash[0]}, a name kvbench's own configs use; rename it "
                     f"(a user dir adds configs, it does not replace kvbench's)")
    _USER_DIRS.append(path)
    return path


def user_dirs() -> list[Path]:
    """The config dirs added to the shipped ones, in search order."""
    return list(_USER_DIRS)


def set_user_dirs(entries: Iterable[str | Path]) -> None:
    """Exactly these user config dirs (a job process restores its command's dirs from Hydra's config)."""
    _USER_DIRS.clear()
    for entry in entries:
        add_dir(entry)


@contextlib.contextmanager
def using(entries: Iterable[str | Path]) -> Iterator[list[Path]]:
    """The dirs ``entries`` added for the duration of the block (one command's ``--config-dir``)."""
    before = list(_USER_DIRS)
    try:
        for entry in entries:
            add_dir(entry)
        yield user_dirs()
    finally:
        _USER_DIRS[:] = before


def search_path() -> list[Path]:
    """Where configs are looked up, in order: the shipped dir, then the user dirs."""
    return [CONF_DIR, *_USER_DIRS]


def searchpath_override() -> list[str]:
    """The Hydra override that makes a composition see the user dirs (``[]`` when there are none)."""
    if not _USER_DIRS:
        return []
    return ["hydra.searchpath=[" + ",".join(f"'file://{d}'" for d in _USER_DIRS) + "]"]


def find(group: str, name: str) -> Path | None:
    """The file of config ``name`` of ``group`` (``find("method", "snapkv")``), the first on the search path."""
    for root in search_path():
        path = root / group / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def options(group: str) -> list[str]:
    """The choices of a config group over the search path (``_``-prefixed files are building blocks, not
    choices). ``method`` lists the method configs only: ``method/scorer`` and ``method/allocator`` are the parts'
    own groups; other groups list nested choices as ``ruler/niah_single_1``."""
    names: set[str] = set()
    for root in search_path():
        base = root / group
        if not base.is_dir():
            continue
        files = base.glob("*.yaml") if group == "method" else base.rglob("*.yaml")
        names |= {str(p.relative_to(base).with_suffix("")) for p in files if not p.name.startswith("_")}
    return sorted(names)
