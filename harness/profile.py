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
* **Profile file** (safetensors; the format, its reader and writer: harness/profiles.py): ``budgets [n_ratios,
  n_layers, n_kv_heads]`` = the share of the context each head keeps (fraction of T), ``ratios [n_ratios]``,
  ``curves [n_layers, n_kv_heads, K + 1]`` and ``grid``; metadata: model name and identity (architecture,
  config hash, weights fingerprint), method, task, samples, context length, date. The ``lukv`` allocator
  (methods/lukv.py) reads it, interpolates between ratios and rescales to the current T with exact integer sums.
* **LU-KV's own budget table** (``.npy``, the file of github.com/baidu-baige/LU-KV that kvpress's ``LUKVPress``
  loads, e.g. ``evaluation/curve_data/llama-3.1-8b/ea_0.02_sink4_win1_llama_avg_ratio.npy``): ``method.allocator.profile``
  may name it directly; ``load_profile`` recognises it by content (see ``load_lukv_table``).

Usage (Hydra-style overrides as ``kvbench``, plus the profile's own keys)::

    kvbench-profile model=tiny-random method=lukv task=ruler/niah_single_1 context_length=1024 n_samples=8 \
        out=profiles/tiny.safetensors [ratios=0.05:0.95:0.05] [grid=100] [scope=global] [normalize=layer]

``task=random`` uses random token ids as calibration contexts; a task that cannot be built is an error.
The method's scorer is the within-head order (the method's allocator is ignored).
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from harness.compat import with_cache
from harness.compress import Scorer
from harness.errors import KvbenchError
from harness.models import model_identity, model_name
from harness.profiles import Profile, load_profile, save_profile
from harness.schema import Count
from methods._calibration import calibration_prompts  # noqa: F401  (shared with the methods' calibration commands)
from methods._attention import attention_probs

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


class _FutureCapture(Scorer):
    """A scorer for harness.attention.Hooks that keeps nothing itself: during the forward of the future tokens on the full
    cache, turns each layer's future queries into per-entry utilities ``u [H_kv, T_ctx]``."""

    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx
        self.utility: dict[int, Tensor] = {}

    def score(self, inputs) -> None:
        q, k, v = inputs.queries.float(), inputs.keys.float(), inputs.values.float()
        batch, n_q, q_len, d = q.shape
        n_kv, n_all = k.shape[1], k.shape[2]
        group = n_q // n_kv
        probs = attention_probs(q, k, inputs.scaling, n_all - q_len)  # [B, H_q, q_len, T], causal
        mass = probs.reshape(batch, n_kv, group, q_len, n_all)[..., : self.n_ctx].sum(dim=3)  # [B, H_kv, G, T_ctx]
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
    out = []
    for layer, s in enumerate(scores):
        u = utility[layer]
        if s is None:  # a layer the scorer keeps whole: keeping more is all it can do; rank by position
            s = torch.arange(u.shape[-1], dtype=torch.float32).expand_as(u)
        s = s[0] if s.dim() == 3 else s
        s = method.selector.protect(s.float().cpu())
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
    facts = model_identity(model)
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
    from conf import CONF_DIR
    from harness.cli import check_group_overrides
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
    method_cfg["allocator"] = {"name": "uniform"}  # only the scorer (and the selector's protected tokens) matter
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
