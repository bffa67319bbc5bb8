"""The LU-KV budget profile format: what ``kvbench-profile`` (harness/profile.py) writes and the ``lukv``
allocator (methods/lukv.py) reads.

* **kvbench-profile's file** (safetensors, ``FORMAT``): ``budgets [n_ratios, n_layers, n_kv_heads]`` = the
  share of the context each head keeps (fraction of T), ``ratios [n_ratios]``, optionally ``curves [n_layers,
  n_kv_heads, K + 1]`` and ``grid [K + 1]``; metadata: the model's name (``model``) and identity
  (``harness.models.model_identity``: architecture, config hash, weights fingerprint), method, task, samples,
  context length, date.
* **LU-KV's own budget table** (``.npy``, the file of github.com/baidu-baige/LU-KV that kvpress's ``LUKVPress``
  loads): ``load_profile`` recognises it by content (see ``load_lukv_table``).

A profile is checked against the model it is used with (``check_profile_model``) by the one model identity
check of the harness (``harness.models.check_model_identity``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.errors import KvbenchError
from harness.models import check_model_identity

FORMAT = "kvbench-lukv-profile/1"
LUKV_TABLE_FORMAT = "lukv-npy"  # meta["format"] of a profile read from LU-KV's own .npy budget table
NPY_MAGIC = b"\x93NUMPY"


@dataclass
class Profile:
    budgets: Tensor  # [n_ratios, n_layers, n_kv_heads]: share of the context each head keeps
    ratios: Tensor  # [n_ratios], ascending
    meta: dict[str, Any]
    curves: Tensor | None = None  # [n_layers, n_kv_heads, K + 1]
    grid: Tensor | None = None  # [K + 1]

    @property
    def n_layers(self) -> int:
        return int(self.budgets.shape[1])

    @property
    def n_kv_heads(self) -> int:
        return int(self.budgets.shape[2])

    def shares(self, keep_ratio: float) -> Tensor:
        """``[L, H]`` shares for a keep ratio, linear between the profiled ratios (and toward share 1 at ratio
        1, share proportional below the smallest ratio); the caller rescales to its exact total."""
        ratios = self.ratios.double().tolist()
        table = self.budgets.double()
        if ratios[-1] < 1.0:
            ratios.append(1.0)
            table = torch.cat([table, torch.ones_like(table[:1])])
        r = float(keep_ratio)
        if r <= ratios[0]:
            return table[0] * (r / ratios[0])
        if r >= ratios[-1]:
            return table[-1]
        k = max(i for i, v in enumerate(ratios) if v <= r)
        w = (r - ratios[k]) / (ratios[k + 1] - ratios[k])
        return table[k] * (1 - w) + table[k + 1] * w


def save_profile(path: str | Path, profile: Profile) -> Path:
    from safetensors.torch import save_file

    from harness.io import atomic_save

    path = Path(path)
    tensors = {"budgets": profile.budgets.float().contiguous(), "ratios": profile.ratios.float().contiguous()}
    if profile.curves is not None:
        tensors["curves"] = profile.curves.float().contiguous()
    if profile.grid is not None:
        tensors["grid"] = profile.grid.float().contiguous()
    meta = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in profile.meta.items()}}
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # fsync'd, the user's umask
    return path


def _file_kind(path: Path) -> str:
    """``npy`` (numpy's magic), ``pickle`` (a torch.save / pickle file: a zip archive or a pickle stream) or
    ``safetensors`` (anything else: the safetensors reader judges it)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    return "safetensors"


def load_lukv_table(path: str | Path) -> Profile:
    """LU-KV's official budget table (a ``.npy`` file, read without pickle) as a ``Profile``.

    The format, as kvpress's ``LUKVPress`` (kvpress/presses/lukv_press.py, NVIDIA/kvpress commit 520d418, 2026-07-02)
    and LU-KV's ``evaluation/curve_data/step2_compute_curve.py`` (``np.save`` of the mean allocation over the
    calibration questions) read and write it: one float array ``[99, n_layers, n_kv_heads]``; row ``i`` is the
    global compression ratio ``(i + 1) / 100`` (kvpress picks row ``round(100 * compression_ratio) - 1``), and entry
    ``[i, l, h]`` the fraction of layer ``l``'s tokens that KV head ``h`` *prunes* (each row's mean is the row's
    compression ratio; the protected sinks and window are counted inside the kept share). No metadata: the
    model is only checked by its number of layers and KV heads.

    As a profile: keep ratios ``1 - (i + 1) / 100`` (0.01 .. 0.99), shares ``1 - table[i]``, ``scope=global``
    (the table's layers trade budget). At those ratios the shares are the table's rows; between them the
    ``lukv`` allocator interpolates linearly where kvpress takes the nearest row (kvpress runs compression
    0.875 with the 0.88 row), and its total is the harness's exact count, where kvpress rounds each layer's
    table total (at most a token per head apart).

    ``np.load(..., allow_pickle=False)``: an object array (which needs pickle) is refused, never unpickled."""
    import numpy as np

    path = Path(path)
    where = f"method.allocator.profile={str(path)!r}"
    fmt = ("LU-KV's budget table: a .npy float array [99, n_layers, n_kv_heads] of per-head prune ratios, row i "
           "for compression (i + 1) / 100")
    try:
        table = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise KvbenchError(f"{where} holds Python objects (it needs pickle, which kvbench never loads); give "
                               f"{fmt}") from None
        raise KvbenchError(f"{where} is not a readable .npy file ({err}); give {fmt}") from None
    except (OSError, EOFError) as err:
        raise KvbenchError(f"{where} is damaged or truncated ({err}); give {fmt}") from None
    if not isinstance(table, np.ndarray) or table.ndim != 3 or table.shape[0] != 99 or 0 in table.shape:
        shape = getattr(table, "shape", "?")
        raise KvbenchError(f"{where} has shape {tuple(shape) if shape != '?' else shape}; {fmt}")
    if not (np.issubdtype(table.dtype, np.floating) or np.issubdtype(table.dtype, np.integer)):
        raise KvbenchError(f"{where} holds {table.dtype} values, not numbers; {fmt}")
    prune = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float64))
    if not torch.isfinite(prune).all() or (prune < 0).any() or (prune > 1).any():
        raise KvbenchError(f"{where} holds prune ratios outside [0, 1] (or non-finite); {fmt}")
    n_layers, n_heads = int(prune.shape[1]), int(prune.shape[2])
    keep = torch.tensor([1.0 - (i + 1) / 100 for i in range(99)], dtype=torch.float64)
    order = keep.argsort()
    meta = {"format": LUKV_TABLE_FORMAT, "table": path.name, "scope": "global", "n_layers": n_layers,
            "n_kv_heads": n_heads, "ratios": "1 - (i + 1) / 100, i = 0 .. 98"}
    return Profile((1.0 - prune)[order].float(), keep[order].float(), meta)


def load_profile(path: str | Path) -> Profile:
    """A profile file, checked: a missing, truncated or foreign file, missing or extra tensors, and tensors that
    disagree in shape with each other or with the metadata are one-line ``KvbenchError``s naming the file.

    Two formats, told apart by content: kvbench-profile's safetensors file, and LU-KV's own ``.npy`` budget
    table (``load_lukv_table``). A pickle-based file (``torch.save``'s ``.pt``, a pickle) is refused: it is never
    unpickled."""
    from harness.paths import check_tensors, read_safetensors

    path = Path(path)
    where = f"method.allocator.profile={str(path)!r}"
    remake = "make one with kvbench-profile model=<model> out=<file>"
    if not path.is_file():
        raise KvbenchError(f"{where} does not exist or is not a file; {remake}")
    try:
        kind = _file_kind(path)
    except OSError as err:
        raise KvbenchError(f"{where} cannot be read: {err.strerror or err}") from None
    if kind == "npy":
        return load_lukv_table(path)
    if kind == "pickle":
        raise KvbenchError(
            f"{where} is a pickle-based file (torch.save / pickle), which kvbench never loads; give a kvbench-profile "
            "safetensors file or LU-KV's .npy table (convert a tensor file yourself: read it with torch's "
            "weights_only=True loader, then numpy.save the array as .npy)")
    tensors, raw = read_safetensors(path, f"{where} is not a kvbench-profile file; {remake}")
    if raw.get("format") != FORMAT:
        raise KvbenchError(f"{where} is not a kvbench-profile file (format {raw.get('format')!r}); {remake}")
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    budgets, ratios, curves, grid = (tensors.get(k) for k in ("budgets", "ratios", "curves", "grid"))
    if budgets is None or budgets.dim() != 3:
        shape = "none" if budgets is None else str(tuple(budgets.shape))
        raise KvbenchError(f"{where}: needs budgets [n_ratios, n_layers, n_kv_heads], has {shape}; {remake}")
    n_layers, n_heads = budgets.shape[1:]
    n_ratios = ratios.numel() if ratios is not None else budgets.shape[0]
    n_grid = grid.numel() if grid is not None else curves.shape[-1] if curves is not None else None
    check_tensors(tensors, {"budgets": (n_ratios, n_layers, n_heads), "ratios": (n_ratios,),
                            "curves": (n_layers, n_heads, n_grid), "grid": (n_grid,)},
                  where, f"the file is damaged; {remake}", optional=("curves", "grid"))
    facts = {"n_layers": n_layers, "n_kv_heads": n_heads}
    wrong = [f"{k}={meta[k]!r}" for k in facts if k in meta and meta[k] != facts[k]]
    if wrong:
        raise KvbenchError(f"{where}: its metadata says {', '.join(wrong)} but the budgets are for {n_layers} layers "
                           f"x {n_heads} KV heads; the file is damaged, {remake}")
    if not (torch.isfinite(ratios).all() and ((ratios > 0) & (ratios <= 1)).all()):
        raise KvbenchError(f"{where}: ratios {ratios.tolist()} are not keep ratios in (0, 1]; {remake}")
    if not (torch.isfinite(budgets).all() and (budgets >= 0).all()):
        raise KvbenchError(f"{where}: budgets hold negative or non-finite shares; {remake}")
    order = ratios.argsort()
    return Profile(budgets[order], ratios[order], meta, curves, grid)


def check_profile_model(profile: Profile, model, source: str = "method.allocator.profile") -> None:
    """One-line ``KvbenchError`` when a profile was made for another model: its shape (layers x KV heads), the
    identity its metadata records (``harness.models.check_model_identity``) or the model's name differ."""
    recorded = {**profile.meta, "n_layers": profile.n_layers, "n_kv_heads": profile.n_kv_heads}
    check_model_identity(recorded, model, f"{source} was profiled for model {profile.meta.get('model', '?')!r}",
                         "run kvbench-profile for this model", name=str(profile.meta.get("model") or "") or None)
