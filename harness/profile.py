"""``kvbench-profile``: offline LU-KV budget profiles (per keep ratio, per layer and KV head).

LU-KV ("Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic KV Cache Eviction",
arXiv:2602.08585) allocates budgets to maximise the *future utility* kept in the cache. Here:

* **Utility of a cached entry** ``j`` of KV head ``h`` (layer ``l``): what it contributes to future outputs,
  ``u_j = sum over future queries t and the query heads g of h of  a_{g,t,j} * ||W_o^(g) v_j||``, with ``a`` the
  attention of the *future* queries (question + reference answer of a calibration sample, teacher-forced
  after the context; random tokens for the random calibration set) on the full cache and ``W_o^(g)`` the
  columns of ``o_proj`` that read query head ``g``.
* **Retained-utility curve** of a head: ``U_h(b)`` = sum of ``u`` over the ``b`` entries the method's own
  within-head scorer keeps (its scores on the context prefill, sinks/recent protected as the selector does),
  on a grid ``b = f * T``, ``f = 0, 1/K, ..., 1``. Curves are normalised per sample (``normalize=layer``: each
  layer's heads sum to 1 at full budget, so every layer weighs the same; ``normalize=global``: all heads of
  the model sum to 1) and averaged over samples.
* **Allocation**: the upper concave envelope (convex hull) of each curve, then greedy by marginal utility over
  the hull segments (the optimum of the relaxed problem, where the last segment is taken fractionally).
  ``scope=global`` (LU-KV, default): one budget for all layers and heads, ``total = L * H * keep_ratio * T``;
  ``scope=layer``: each layer's heads share ``H * keep_ratio * T``.
* **Profile file** (safetensors): ``budgets [n_ratios, n_layers, n_kv_heads]`` = the share of the context each
  head keeps (fraction of T), ``ratios [n_ratios]``, ``curves [n_layers, n_kv_heads, K + 1]`` and ``grid``;
  metadata: model name, config fingerprint, n_layers, n_kv_heads, method, task, samples, context length, date.
  The ``lukv`` allocator (methods/lukv.py) reads it, interpolates between ratios and rescales to the current
  T with exact integer sums.
* **LU-KV's own budget table** (``.npy``, the file of github.com/baidu-baige/LU-KV that kvpress's ``LUKVPress``
  loads, e.g. ``evaluation/curve_data/llama-3.1-8b/ea_0.02_sink4_win1_llama_avg_ratio.npy``): ``method.profile``
  may name it directly; ``load_profile`` recognises it by content (see ``load_lukv_table``).

Usage (Hydra-style overrides as ``kvbench``, plus the profile's own keys)::

    kvbench-profile model=tiny-random method=lukv task=ruler/niah_single_1 context_length=1024 n_samples=8 \
        out=profiles/tiny.safetensors [ratios=0.05:0.95:0.05] [grid=100] [scope=global] [normalize=layer]

``task=random`` uses random token ids as calibration contexts; a task that cannot be built is an error.
The method's scorer is the within-head order (the method's allocator is ignored).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from harness.compat import with_cache
from harness.errors import KvbenchError
from harness.schema import Count

FORMAT = "kvbench-lukv-profile/1"
LUKV_TABLE_FORMAT = "lukv-npy"  # meta["format"] of a profile read from LU-KV's own .npy budget table
NPY_MAGIC = b"\x93NUMPY"
DEFAULT_RATIOS = [round(0.05 * i, 2) for i in range(1, 20)]


# --------------------------------------------------------------------------------------------------------------
# Hull and greedy allocation (pure math, tested on hand-made curves)


def concave_envelope(x: list[float], y: list[float]) -> list[int]:
    """Indices of the points on the upper concave envelope of ``(x, y)`` (``x`` strictly increasing),
    first and last point included (Andrew's monotone chain, upper half)."""
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or below the segment a -> i
            cross = (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a])
            if cross >= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def hull_segments(x: list[float], y: list[float]) -> list[tuple[float, float]]:
    """``(length, slope)`` of the envelope's segments from left to right (slopes non-increasing)."""
    idx = concave_envelope(x, y)
    return [(x[b] - x[a], (y[b] - y[a]) / (x[b] - x[a])) for a, b in zip(idx, idx[1:])]


def greedy_allocate(x: list[float], curves: Tensor, total: float) -> Tensor:
    """Budgets (in ``x`` units, from ``x[0]``) of each curve ``[N, K+1]`` summing to ``total``: greedy marginal
    utility over the hull segments (highest slope first; ties: lower curve index, then left segment)."""
    n = curves.shape[0]
    segs = []
    for i in range(n):
        for j, (length, slope) in enumerate(hull_segments(x, curves[i].tolist())):
            segs.append((-slope, i, j, length))
    segs.sort()
    out = torch.full((n,), float(x[0]), dtype=torch.float64)
    left = float(total) - float(x[0]) * n
    for _, i, _, length in segs:
        if left <= 1e-12:
            break
        take = min(length, left)
        out[i] += take
        left -= take
    return out


def round_to_total(ideal: Tensor, total: int, lo: Tensor | int, hi: Tensor | int) -> Tensor:
    """Integers within ``[lo, hi]`` summing to ``total`` (clipped to what the bounds allow), close to ``ideal``:
    floor, then +1 to the largest fractional parts (or -1 to the smallest) until the sum is exact."""
    ideal = ideal.double().flatten()
    lo_t = torch.as_tensor(lo, dtype=torch.long).flatten().expand_as(ideal).clone()
    hi_t = torch.as_tensor(hi, dtype=torch.long).flatten().expand_as(ideal).clone()
    total = int(min(max(total, int(lo_t.sum())), int(hi_t.sum())))
    out = torch.minimum(torch.maximum(ideal.floor().long(), lo_t), hi_t)
    frac = ideal - ideal.floor()
    while int(out.sum()) != total:
        diff = total - int(out.sum())
        if diff > 0:
            room = out < hi_t
            key = torch.where(room, frac + (ideal - out.double()).clamp(min=0), torch.full_like(frac, -1e18))
            order = key.argsort(descending=True, stable=True)[: min(diff, int(room.sum()))]
            out[order] += 1
        else:
            room = out > lo_t
            key = torch.where(room, frac - (out.double() - ideal).clamp(min=0), torch.full_like(frac, 1e18))
            order = key.argsort(stable=True)[: min(-diff, int(room.sum()))]
            out[order] -= 1
    return out


# --------------------------------------------------------------------------------------------------------------
# Profile files


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


def model_fingerprint(config) -> dict[str, Any]:
    """Architecture facts a profile must match (and a short hash of them)."""
    text = getattr(config, "text_config", config)
    facts = {
        "model_type": getattr(text, "model_type", "?"),
        "n_layers": int(getattr(text, "num_hidden_layers", 0)),
        "n_kv_heads": int(getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", 0)),
        "n_heads": int(getattr(text, "num_attention_heads", 0)),
        "hidden_size": int(getattr(text, "hidden_size", 0)),
        "head_dim": int(getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // max(1, getattr(text, "num_attention_heads", 1))),
        "vocab_size": int(getattr(text, "vocab_size", 0)),
    }
    facts["config_hash"] = hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return facts


def model_name(model, fallback: str = "") -> str:
    name = str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", "") or "")
    return name.rstrip("/").split("/")[-1] if name else fallback


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
    where = f"method.profile={str(path)!r}"
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
    where = f"method.profile={str(path)!r}"
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


def check_profile_model(profile: Profile, model, source: str = "method.profile") -> None:
    """One-line ``KvbenchError`` when a profile was made for another model (architecture or name)."""
    facts = model_fingerprint(model.config)
    if (profile.n_layers, profile.n_kv_heads) != (facts["n_layers"], facts["n_kv_heads"]):
        raise KvbenchError(
            f"{source} was profiled for {profile.meta.get('model', '?')!r} with {profile.n_layers} layers x "
            f"{profile.n_kv_heads} KV heads; this model has {facts['n_layers']} x {facts['n_kv_heads']}: run kvbench-profile for it"
        )
    want = profile.meta.get("config_hash")
    if want and want != facts["config_hash"]:
        raise KvbenchError(
            f"{source} was profiled for another model ({profile.meta.get('model', '?')!r}, config {want}; this model's "
            f"config is {facts['config_hash']}): run kvbench-profile for it"
        )
    name, theirs = model_name(model), profile.meta.get("model") or ""
    if name and theirs and name != theirs:
        raise KvbenchError(f"{source} was profiled for model {theirs!r}, not {name!r}: run kvbench-profile for it")


def allocate_table(curves: Tensor, grid: list[float], ratios: list[float], scope: str) -> Tensor:
    """``[n_ratios, L, H]`` shares from averaged curves ``[L, H, K+1]``."""
    n_layers, n_heads = curves.shape[:2]
    rows = []
    for r in ratios:
        if scope == "global":
            shares = greedy_allocate(grid, curves.reshape(n_layers * n_heads, -1), r * n_layers * n_heads)
            rows.append(shares.reshape(n_layers, n_heads))
        else:
            rows.append(torch.stack([greedy_allocate(grid, curves[l], r * n_heads) for l in range(n_layers)]))
    return torch.stack(rows).float()


# --------------------------------------------------------------------------------------------------------------
# Measuring the curves


class _FutureCapture:
    """A Scorer-like object for harness.attention.Hooks: during the forward of the future tokens on the full
    cache, turns each layer's future queries into per-entry utilities ``u [H_kv, T_ctx]``."""

    shares_across_ratios = True
    needs_hidden_states = False

    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx
        self.utility: dict[int, Tensor] = {}

    def score(self, inputs) -> None:
        q, k, v = inputs.queries.float(), inputs.keys.float(), inputs.values.float()
        batch, n_q, q_len, d = q.shape
        n_kv, n_all = k.shape[1], k.shape[2]
        group = n_q // n_kv
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q.reshape(batch, n_kv, group, q_len, d), k) * inputs.scaling
        q_pos = torch.arange(n_all - q_len, n_all, device=k.device)[:, None]
        logits = logits.masked_fill(torch.arange(n_all, device=k.device)[None, :] > q_pos, float("-inf"))
        mass = logits.softmax(dim=-1)[..., : self.n_ctx].sum(dim=3)  # [B, H_kv, G, T_ctx]
        w_o = inputs.module.o_proj.weight.float()  # [hidden, H_q * d]
        w_o = w_o.reshape(w_o.shape[0], n_kv, group, d)
        gram = torch.einsum("ohgd,ohge->hgde", w_o, w_o)  # W_o^(g)^T W_o^(g), [H_kv, G, d, d]
        # ||W_o^(g) v_j|| = sqrt(v_j^T gram_g v_j) for each query head g of KV head h and context entry j
        vc = v[:, :, : self.n_ctx]
        contrib = torch.einsum("bhjd,hgde,bhje->bhgj", vc, gram, vc).clamp(min=0).sqrt()  # [B, H_kv, G, T]
        self.utility[inputs.layer_idx] = (mass * contrib).sum(dim=2)[0].cpu()
        return None


def grid_points(n_tokens: int, grid: list[float]) -> Tensor:
    return torch.tensor([min(n_tokens, int(round(f * n_tokens))) for f in grid], dtype=torch.long)


def retained_curves(scores: list[Tensor], utility: dict[int, Tensor], method, grid: list[float]) -> Tensor:
    """``[L, H, K+1]`` utility kept at each grid budget, entries ranked by the method's protected scores."""
    from harness.compress import protect

    out = []
    for layer, s in enumerate(scores):
        u = utility[layer]
        if s is None:  # a layer the scorer keeps whole: keeping more is all it can do; rank by position
            s = torch.arange(u.shape[-1], dtype=torch.float32).expand_as(u)
        s = s[0] if s.dim() == 3 else s
        s = protect(s.float().cpu(), method.n_sink, method.n_recent)
        order = s.argsort(dim=-1, descending=True, stable=True)
        cum = torch.cat([torch.zeros(u.shape[0], 1), u.gather(-1, order).double().cumsum(-1)], dim=-1)
        out.append(cum[:, grid_points(u.shape[-1], grid)])
    return torch.stack(out)


@torch.no_grad()
def measure_curves(model, method, prompts: list[tuple[list[int], list[int]]], grid: list[float], normalize: str,
                   seed: int = 0) -> Tensor:
    """Mean normalised retained-utility curves ``[L, H, K+1]`` over calibration prompts (context, future)."""
    from harness.attention import install
    from harness.pipeline import prefill

    total = None
    device = model.device
    with install(model) as hooks:
        for i, (ctx, future) in enumerate(prompts):
            pre = prefill(model, hooks, ctx, method, seed=seed + i)
            capture = _FutureCapture(len(ctx))
            with hooks.scoring(capture, seed + i):
                ids = torch.tensor([future], device=device)
                pos = torch.arange(len(ctx), len(ctx) + len(future), device=device)[None]
                model(input_ids=ids, position_ids=pos, **with_cache(pre.cache), use_cache=True, logits_to_keep=1)
            curves = retained_curves(pre.scores, capture.utility, method, grid)
            full = curves[..., -1]
            if normalize == "global":
                curves = curves / full.sum().clamp(min=1e-30)
            else:
                curves = curves / full.sum(dim=1, keepdim=True)[..., None].clamp(min=1e-30)
            total = curves if total is None else total + curves
            del pre
    return total / len(prompts)


def calibration_prompts(tokenizer, cfg, n_samples: int | None, context_length: int, seed: int, future_tokens: int,
                        chat: bool, random: bool = False) -> tuple[list[tuple[list[int], list[int]]], str]:
    """(context ids, future ids) pairs from the task (question + answer teacher-forced), or random ids.

    A task that cannot be built (unknown, data missing or corrupt) is an error, never a silent switch to
    random tokens: the profile would then describe other inputs than its metadata says."""
    if not random:
        import tasks
        from harness.runner import task_params
        from tasks.base import PromptEncoder

        task_name = str(cfg.task.name)
        try:
            task = tasks.get_task(task_name, **task_params(cfg.task))
        except KeyError:
            raise KvbenchError(f"task={task_name!r} is not a task kvbench-profile can calibrate on; allowed: random, "
                               f"{', '.join(tasks.available())}") from None
        encoder = PromptEncoder(tokenizer, chat=chat and not getattr(task, "skip_chat_template", False))
        out = []
        for sample in task.samples(encoder, context_length, n_samples, seed):
            ctx, q = encoder.encode_sample(sample)
            answer = tokenizer(sample.answers[0], add_special_tokens=False).input_ids if sample.answers else []
            out.append((list(ctx), list(q) + list(answer)))
        if not out:
            raise KvbenchError(f"task={task_name!r} gave no calibration samples (n_samples={n_samples})")
        return out, task_name
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else 256
    low = min(8, vocab - 1)
    out = []
    for _ in range(n_samples):
        ids = torch.randint(low, vocab, (context_length,), generator=gen).tolist()
        n_future = min(future_tokens, context_length // 4)
        out.append((ids[: context_length - n_future], ids[context_length - n_future :]))
    return out, "random"


def parse_ratios(text: str) -> list[float]:
    text = str(text).strip().strip("[]")
    try:
        if ":" in text:
            start, stop, step = (float(t) for t in text.split(":"))
            n = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 6) for i in range(min(n, 10_000))]
        else:
            values = [float(t) for t in text.split(",") if t.strip()]
    except (ValueError, ZeroDivisionError, OverflowError):
        values = []
    if not values or any(not 0 < v <= 1 for v in values):
        raise KvbenchError(f"ratios={text!r}: give keep ratios in (0, 1], e.g. 0.05:0.95:0.05 or 0.1,0.25,0.5")
    return sorted(set(values))


def build_profile(model, method, prompts, ratios: list[float], grid_size: int, scope: str, normalize: str,
                  meta: dict[str, Any], seed: int = 0) -> Profile:
    if scope not in ("global", "layer"):
        raise KvbenchError(f"scope={scope!r} is not supported; allowed: global, layer")
    if normalize not in ("layer", "global"):
        raise KvbenchError(f"normalize={normalize!r} is not supported; allowed: layer, global")
    if grid_size < 2:
        raise KvbenchError(f"grid={grid_size} must be at least 2")
    grid = [i / grid_size for i in range(grid_size + 1)]
    curves = measure_curves(model, method, prompts, grid, normalize, seed)
    table = allocate_table(curves, grid, ratios, scope)
    facts = model_fingerprint(model.config)
    meta = {**meta, **facts, "scope": scope, "normalize": normalize, "ratios": ratios, "grid_size": grid_size,
            "n_calibration": len(prompts), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return Profile(table, torch.tensor(ratios), meta, curves.float(), torch.tensor(grid))


# --------------------------------------------------------------------------------------------------------------
# Command line


def _split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own, overrides = {}, []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" in arg and key in OWN_KEYS:
            value = arg.split("=", 1)[1]
            own[key] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value
        elif arg == "task=random":  # the profile's own calibration set, not a registered task
            own["task"] = "random"
        else:
            overrides.append(arg)
    return own, overrides


class ProfileOptions(BaseModel):
    """The profile's own keys (not kvbench's); lax types: they come from the command line as text."""
    model_config = ConfigDict(extra="forbid")
    out: Annotated[str, Field(min_length=1)]
    ratios: str = ",".join(str(r) for r in DEFAULT_RATIOS)
    grid: Count = 100
    scope: Literal["global", "layer"] = "global"
    normalize: Literal["layer", "global"] = "layer"
    future_tokens: Count = 64
    task: Literal["random"] | None = None


OWN_KEYS = set(ProfileOptions.model_fields) - {"task"}  # task=random is parsed apart: task= is also kvbench's


def run(argv: list[str]) -> Path:
    from omegaconf import OmegaConf

    import methods
    from harness.cli import CONF_DIR, check_group_overrides
    from harness.models import load_model
    from harness.overrides import Composer
    from harness.schema import to_error, validate

    own, overrides = _split_args(argv)
    if "out" not in own:
        raise KvbenchError("out=<file.safetensors> is required (where the profile is written)")
    try:
        ProfileOptions.model_validate(own)
    except ValidationError as err:
        raise to_error(err, own, known=ProfileOptions.model_fields) from None
    check_group_overrides(overrides)
    if not any(o.lstrip("+").startswith("method=") for o in overrides):
        overrides = ["method=lukv", *overrides]
    with Composer(CONF_DIR, "config") as composer:
        cfg = composer.compose(overrides)
    validate(cfg)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method_cfg["allocator"] = "uniform"  # only the scorer (and the selector's protected tokens) matter here
    method_cfg = {k: v for k, v in method_cfg.items() if k not in ("profile", "alpha", "beta")}
    method = methods.build_method(method_cfg)
    if method.scorer is None:
        raise KvbenchError(f"method={cfg.method.name} has no scorer; profile a method that evicts (e.g. method=lukv)")
    model, tok = load_model(cfg.model)
    ratios = parse_ratios(own.get("ratios", ",".join(str(r) for r in DEFAULT_RATIOS)))
    n_samples = None if cfg.n_samples is None else int(cfg.n_samples)  # None: all of a dataset's records
    if n_samples is None and own.get("task") == "random":
        raise KvbenchError("task=random needs n_samples=<number of calibration contexts>")
    prompts, source = calibration_prompts(tok, cfg, n_samples, int(cfg.context_length), int(cfg.seed),
                                          int(own.get("future_tokens", 64)), bool(cfg.model.get("chat", False)),
                                          own.get("task") == "random")
    meta = {"model": model_name(model, str(cfg.model.name)), "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
            "method": method_cfg, "task": source, "n_samples": len(prompts), "context_length": int(cfg.context_length),
            "seed": int(cfg.seed)}
    profile = build_profile(model, method, prompts, ratios, int(own.get("grid", 100)), own.get("scope", "global"),
                            own.get("normalize", "layer"), meta, int(cfg.seed))
    return save_profile(own["out"], profile)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    from harness.cli import fail, interrupts_reported

    with interrupts_reported("kvbench-profile", lambda: " (no profile written)"):
        try:
            path = run(argv)
        except KvbenchError as err:
            fail(str(err), prog="kvbench-profile")
    prof = load_profile(path)
    print(f"{path}: {prof.n_layers} layers x {prof.n_kv_heads} KV heads, {prof.ratios.numel()} ratios, "
          f"{prof.meta.get('n_samples')} {prof.meta.get('task')} samples")


if __name__ == "__main__":
    main()
