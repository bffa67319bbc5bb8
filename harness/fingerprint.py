"""Fingerprints of the files a run reads besides its config: the model's weights, a learned method's checkpoint,
a profile. A run dir records them in ``config.yaml`` (key ``inputs``) so that resuming after one of them changed
(a retrained reference model, a new LKV checkpoint at the same path) is refused instead of appending rows of two
different models to one table.

A file up to 64 MiB is hashed whole; a larger one (a real model's shard) by its size and three 1 MiB pieces
(start, middle, end): retraining or replacing weights changes those, and an 8B checkpoint is not re-read on
every resume.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from harness.paths import unreadable

WHOLE_LIMIT = 64 << 20
PIECE = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def file_digest(path: Path) -> str:
    try:
        size = path.stat().st_size
        h = hashlib.sha1(str(size).encode())
        with open(path, "rb") as fh:
            if size <= WHOLE_LIMIT:
                h.update(fh.read())
            else:
                for offset in (0, size // 2, size - PIECE):
                    fh.seek(offset)
                    h.update(fh.read(PIECE))
    except OSError as err:  # removed or made unreadable since it was loaded
        raise unreadable(path, err, "the run's input files must stay readable while it starts") from None
    return h.hexdigest()[:16]


def path_digest(path: Path) -> str:
    """A file's digest, or a directory's: its config.json and weight files (not training state or notes)."""
    if path.is_file():
        return file_digest(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("train_state")
                   and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    h = hashlib.sha1()
    for f in files:
        h.update(f"{f.name}:{file_digest(f)};".encode())
    return h.hexdigest()[:16]


def run_inputs(model: Any, parts) -> dict[str, str]:
    """``{"model": digest, "method.scorer.checkpoint": digest, ...}`` for the files this run reads: the model's
    directory (a model built from a config, such as tiny-random, has none: its seed is in the config) and what
    each method part (scorer, allocator) reports through ``input_files()`` - the paths it resolved and loaded."""
    out = {}
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if source and Path(source).exists():
        out["model"] = path_digest(Path(source))
    for part in (p for p in parts if p is not None):
        for key, path in part.input_files().items():
            out[key] = path_digest(Path(path))
    return out
