"""Where a user-given input file (a method checkpoint, a budget profile) is looked up: one rule for all of them."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

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
