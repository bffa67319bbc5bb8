"""LKV ("LKV: End-to-End Learning of Head-wise Budgets and Token Selection for LLM KV Cache Eviction",
arXiv:2605.06676): learned KV eviction on a frozen model, LKV-T (token importance) + LKV-H (head budgets).

* **LKV-T** (scorer ``lkv``): per (layer, KV head), a 2-layer MLP maps each cached token's post-RoPE key and
  value (optionally also the layer's input hidden state, ``use_hidden``) to an importance logit. No attention
  is computed; all heads of a layer run as one batched einsum. Features are standardised with per-(layer,
  head) statistics measured on the first training sample and stored with the checkpoint.
* **LKV-H** (allocator ``lkv``): learnable budget logits per (layer, KV head). Head ``(l, h)`` gets
  ``softmax(logits)[l, h] * L * H * n_keep(T, keep_ratio)`` entries: the global budget equals the uniform
  one, the softmax runs over all heads of all layers, each budget is capped at ``T`` (the excess is
  re-shared proportionally among the uncapped heads) and floored at ``min_budget``; rounding is
  largest-remainder, so the budgets sum exactly to the global budget.
* Inference: hard top-``b`` per head of the learned scores with the learned budgets, ``n_recent`` most recent
  (and optional ``n_sink`` first) tokens always kept inside the budget (the harness's selector).

Training (``kvbench-train method=lkv``, ``LKVLearner`` below) is end to end on a frozen model: the context is
prefilled with the full cache (as at inference, where compression happens after the prefill), then the
question + answer run on that cache with soft keep-probabilities ``p = sigmoid((s - tau_h) / temp)`` on the
context keys, ``tau_h`` solved per head so that ``sum_j p_hj`` equals the head's soft budget (bisection, then
one Newton step with the root detached: it carries the exact implicit gradient to the scores and the budget
logits). ``p`` enters attention as an additive ``log p`` bias (``mode=bias``, through ``harness.attention.attention_masks``;
sdpa's math path backpropagates through a float mask), and/or as DiffPrune's information throttler
(``mode=throttle``): values become ``sqrt(p) v + sqrt(1 - p) sigma eps`` (variance preserving, sigma the
head's value std). Loss: next-token loss on the answer and KL to the full-cache model, plus a budget penalty
on the mean keep rate (exactly on target by construction of ``tau``; it only matters with ``fixed_tau``).
The recent window (and sinks) get ``p = 1`` and count inside the budget, as at inference.

Unknowns (the paper's full text is not available offline), chosen simply and configurable: MLP width 32,
GELU; budgets shared across keep ratios (the ratio sampled per training step); temperature 1.

Checkpoints (``method.scorer.checkpoint=<dir>``): ``params.safetensors`` (learned tensors only) + ``config.json``
naming the model (name/path, family, n_layers, n_kv_heads, head_dim, hidden_size) and the hyper-parameters.
The checkpoint files and the training helpers are shared with SP-KV (``methods/_learned.py``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.attention import attention_masks
from harness.cache import bottom_right_causal
from harness.compat import with_cache
from harness.compress import (Allocator, LayerInputs, Scorer, n_keep, register_allocator, register_scorer,
                              round_to_total)
from harness.errors import KvbenchError
from harness.learning import Learner, register_learner
from harness.models import model_identity
from harness.paths import check_tensors
from harness.schema import Count
from methods._learned import (CONFIG_FILE, PARAMS_FILE, check_model, check_shape, copy_cache, expand_heads,
                              load_checkpoint, load_params, params_file, resolve_checkpoint, retrain_hint)

LKV_HPARAMS = {"width": int, "use_hidden": bool}  # what LKVParams.from_checkpoint reads from config.json


# --------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------
class LKVParams(nn.Module):
    """Scorer MLPs of every (layer, KV head) and the budget logits; ``[L, H, ...]`` tensors."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, hidden_size: int = 0, width: int = 32,
                 use_hidden: bool = False, seed: int = 0):
        super().__init__()
        self.use_hidden = bool(use_hidden)
        n_feat = 2 * head_dim + (hidden_size if use_hidden else 0)
        g = torch.Generator().manual_seed(seed)
        L, H = n_layers, n_kv_heads
        self.w1 = nn.Parameter(torch.randn(L, H, n_feat, width, generator=g) * n_feat ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(L, H, width))
        self.w2 = nn.Parameter(torch.randn(L, H, width, generator=g) * width ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(L, H))
        self.budget_logits = nn.Parameter(torch.zeros(L, H))
        self.register_buffer("feat_mean", torch.zeros(L, H, n_feat))
        self.register_buffer("feat_std", torch.ones(L, H, n_feat))

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict[str, Tensor], where: str | Path = PARAMS_FILE) -> "LKVParams":
        """The parameters of a checkpoint loaded with ``load_checkpoint(..., "lkv", LKV_HPARAMS)``; ``where``
        names its params file in errors."""
        hp, m = config["hparams"], config["model"]
        p = cls(m["n_layers"], m["n_kv_heads"], m["head_dim"], m["hidden_size"], hp["width"], hp["use_hidden"])
        load_params(p, tensors, where, "lkv")
        return p

    def features(self, layer: int, keys: Tensor, values: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Raw features ``[B, H, T, F]``: concat(key, value[, hidden state])."""
        x = torch.cat([keys.float(), values.float()], dim=-1)
        if self.use_hidden:
            if hidden is None:
                raise RuntimeError("LKV with use_hidden needs the layer's hidden states")
            b, h, t, _ = x.shape
            x = torch.cat([x, hidden.float()[:, None].expand(b, h, t, -1)], dim=-1)
        return x

    def scores(self, layer: int, keys: Tensor, values: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Importance logits ``[B, H, T]`` of one layer's cached tokens."""
        x = self.features(layer, keys, values, hidden)
        x = (x - self.feat_mean[layer][None, :, None]) / self.feat_std[layer][None, :, None]
        h = F.gelu(torch.einsum("bhtf,hfk->bhtk", x, self.w1[layer]) + self.b1[layer][None, :, None])
        return torch.einsum("bhtk,hk->bht", h, self.w2[layer]) + self.b2[layer][None, :, None]

    @torch.no_grad()
    def fit_normalization(self, feats: list[Tensor]) -> None:
        """Per-(layer, head) feature mean/std from ``[B, H, T, F]`` features of every layer."""
        for layer, x in enumerate(feats):
            flat = x.float().transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])
            self.feat_mean[layer] = flat.mean(dim=1)
            self.feat_std[layer] = flat.std(dim=1).clamp_min(1e-3)


# --------------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------------
def share_out(shares: Tensor, total: int, lo: int, hi: int) -> Tensor:
    """Integers in ``[lo, hi]`` proportional to ``shares`` (water-filling at the bounds), summing to ``total``
    (clamped to what the bounds allow); rounded by ``harness.compress.round_to_total``."""
    shares = shares.double().clamp_min(0)
    n = shares.numel()
    lo = min(lo, hi)
    total = int(min(max(total, n * lo), n * hi))
    val = torch.zeros(n, dtype=torch.float64)
    fixed = torch.zeros(n, dtype=torch.bool)
    for _ in range(2 * n + 1):
        free = ~fixed
        if not free.any():
            break
        remaining = total - float(val[fixed].sum())
        s = shares[free]
        alloc = s / s.sum() * remaining if float(s.sum()) > 0 else torch.full_like(s, remaining / int(free.sum()))
        over, under = alloc > hi, alloc < lo
        idx = free.nonzero().flatten()
        if over.any():
            val[idx[over]], fixed[idx[over]] = float(hi), True
        elif under.any():
            val[idx[under]], fixed[idx[under]] = float(lo), True
        else:
            val[idx] = alloc
            break
    return round_to_total(val, total, lo, hi)


def hard_budgets(budget_logits: Tensor, n_tokens: int, keep_ratio: float, min_budget: int = 1,
                 rule: str = "floor") -> Tensor:
    """``[L, H]`` integer budgets: softmax share of ``L * H * n_keep(T, ratio, rule)``, capped at ``T``."""
    L, H = budget_logits.shape
    total = L * H * n_keep(n_tokens, keep_ratio, rule)
    shares = torch.softmax(budget_logits.detach().double().flatten(), dim=0)
    return share_out(shares, total, max(1, min(min_budget, n_tokens)), n_tokens).view(L, H)


def soft_budgets(budget_logits: Tensor, n_tokens: int, keep_ratio: float) -> Tensor:
    """``[L, H]`` differentiable budgets (sum ``L * H * ratio * T``), clamped to ``[1, T]``."""
    L, H = budget_logits.shape
    total = L * H * keep_ratio * n_tokens
    return (torch.softmax(budget_logits.flatten(), dim=0) * total).view(L, H).clamp(1.0, float(n_tokens))


def keep_logprobs(scores: Tensor, budgets: Tensor, protected: Tensor, temp: float = 1.0, iters: int = 40) -> Tensor:
    """``log p`` ``[H, T]`` of soft keep-probabilities ``p = sigmoid((s - tau_h) / temp)``.

    ``tau_h`` makes the expected number kept per head (protected tokens count 1 each) equal ``budgets[h]``:
    bisection without gradient, then one Newton step from the detached root, which gives the implicit
    gradient ``dtau/ds_j = p'_j / sum p'`` and ``dtau/db = -temp / sum p'``.
    """
    free = ~protected
    n_free = int(free.sum())
    out = torch.zeros_like(scores)
    if n_free == 0:
        return out
    s = scores[:, free]
    target = (budgets - float(protected.sum())).clamp(0.05, n_free - 0.05)
    with torch.no_grad():
        sd = s.detach()
        lo = sd.min(dim=1).values - 30 * temp
        hi = sd.max(dim=1).values + 30 * temp
        tgt = target.detach()
        for _ in range(iters):
            mid = (lo + hi) / 2
            count = torch.sigmoid((sd - mid[:, None]) / temp).sum(dim=1)
            lo = torch.where(count > tgt, mid, lo)
            hi = torch.where(count > tgt, hi, mid)
        tau0 = (lo + hi) / 2
    z = (s - tau0[:, None]) / temp
    p = torch.sigmoid(z)
    slope = (p * (1 - p)).sum(dim=1).detach().clamp_min(1e-6)
    tau = tau0 + (p.sum(dim=1) - target) * temp / slope
    out = out.clone()
    out[:, free] = F.logsigmoid((s - tau[:, None]) / temp)
    return out


# --------------------------------------------------------------------------------------------------------
# Scorer and allocator
# --------------------------------------------------------------------------------------------------------
@register_scorer("lkv")
class LKVScorer(Scorer):
    """LKV-T: the learned per-head MLP scores of a checkpoint."""

    def __init__(self, checkpoint: str | None = None):
        self.checkpoint = checkpoint
        self.config, tensors = load_checkpoint(checkpoint, "lkv", LKV_HPARAMS)
        self.params = LKVParams.from_checkpoint(self.config, tensors, params_file(checkpoint, "lkv")).eval()
        self.needs_hidden_states = self.params.use_hidden
        self._checked: set[int] = set()

    def input_files(self) -> dict[str, Path]:
        """The files this part read (the runner fingerprints them so a run dir cannot mix two checkpoints)."""
        return {"method.scorer.checkpoint": resolve_checkpoint(self.checkpoint, "lkv")}

    def bind_model(self, model: nn.Module) -> None:
        """Refuse a checkpoint made for another model (the runner calls this right after loading the model)."""
        if id(model) not in self._checked:
            check_model(self.config, model, f"method.scorer.checkpoint={self.checkpoint!r}")
            self._checked.add(id(model))
        self.params.to(model.device)

    def prefill_patch(self, model: nn.Module, keep_ratio: float):
        self.bind_model(model)
        return super().prefill_patch(model, keep_ratio)

    def score(self, inputs: LayerInputs) -> Tensor:
        check_shape(self.config, inputs.n_layers, inputs.keys.shape[1], f"method.scorer.checkpoint={self.checkpoint!r}")
        return self.params.scores(inputs.layer_idx, inputs.keys, inputs.values, inputs.hidden_states)


@register_allocator("lkv")
class LKVAllocator(Allocator):
    """LKV-H: learned budget shares of a checkpoint (any scorer may use them)."""

    per_head_budgets = True
    per_layer_budgets = True

    def __init__(self, checkpoint: str | None = None, min_budget: Count = 1):
        self.checkpoint = checkpoint
        self.config, tensors = load_checkpoint(checkpoint, "lkv")
        # only the budget logits are read here (the other tensors are the scorer's, checked by LKVParams)
        want = {"budget_logits": (self.config["model"]["n_layers"], self.config["model"]["n_kv_heads"])}
        check_tensors({k: v for k, v in tensors.items() if k in want}, want, str(params_file(checkpoint, "lkv")),
                      f"it does not match its {CONFIG_FILE}; {retrain_hint('lkv')}")
        self.budget_logits = tensors["budget_logits"].float()
        self.min_budget = int(min_budget)

    def input_files(self) -> dict[str, Path]:
        return {"method.allocator.checkpoint": resolve_checkpoint(self.checkpoint, "lkv")}

    def bind_model(self, model: nn.Module) -> None:
        check_model(self.config, model, f"method.allocator.checkpoint={self.checkpoint!r}")

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:
        check_shape(self.config, len(scores), scores[0].shape[-2], f"method.allocator.checkpoint={self.checkpoint!r}")
        return hard_budgets(self.budget_logits, scores[0].shape[-1], keep_ratio, self.min_budget, self.budget_rule)


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------
@register_learner("lkv")
class LKVLearner(Learner):
    """Training of LKV-T + LKV-H on a frozen model (see the module docstring)."""

    def __init__(self, model: nn.Module, method_cfg: dict, hp: dict, seed: int = 0):
        sig = model_identity(model)
        model.requires_grad_(False)  # LKV trains only its own parameters
        self.hp = {"width": int(hp.get("width", 32)), "use_hidden": bool(hp.get("use_hidden", False)),
                   "mode": str(hp.get("mode", "bias")), "temp": float(hp.get("temp", 1.0)),
                   "budget_weight": float(hp.get("budget_weight", 1.0)),
                   "learn_budgets": bool(hp.get("learn_budgets", True))}
        if self.hp["mode"] not in ("bias", "throttle", "both"):
            raise KvbenchError(f"lkv.mode={self.hp['mode']!r} is not supported; allowed: bias, throttle, both")
        selector = method_cfg.get("selector") or {}  # the tokens the method's selector protects at inference
        self.n_sink = int(selector.get("n_sink") or 0)
        self.n_recent = int(selector.get("n_recent") or 0)
        self.params = LKVParams(sig["n_layers"], sig["n_kv_heads"], sig["head_dim"], sig["hidden_size"],
                                self.hp["width"], self.hp["use_hidden"], seed=seed)
        if not self.hp["learn_budgets"]:
            self.params.budget_logits.requires_grad_(False)
        self.needs_hidden = self.hp["use_hidden"]
        self.normalized = False

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.params.load_state_dict(tensors)
        self.normalized = True

    def student_logits(self, model, modules, batch, keep_ratio: float, gen: torch.Generator):
        """Logits ``[Lqa, V]`` of the question + answer on the softly compressed context, and the aux losses."""
        cache, hidden, n_ctx = batch.cache, batch.hidden, batch.n_ctx
        feats = None
        if not self.normalized:
            feats = [self.params.features(i, layer.keys, layer.values, hidden.get(i)) for i, layer in enumerate(cache.layers)]
            self.params.fit_normalization(feats)
            self.normalized = True
        device = cache.layers[0].keys.device
        protected = torch.zeros(n_ctx, dtype=torch.bool, device=device)
        protected[: min(self.n_sink, n_ctx)] = True
        if self.n_recent:
            protected[max(0, n_ctx - self.n_recent):] = True
        budgets = soft_budgets(self.params.budget_logits, n_ctx, keep_ratio)
        logps, values, keep_rate = [], [], []
        for i, layer in enumerate(cache.layers):
            s = self.params.scores(i, layer.keys, layer.values, hidden.get(i))[0]
            lp = keep_logprobs(s, budgets[i], protected, self.hp["temp"])
            logps.append(lp)
            keep_rate.append(lp.exp().mean())
            v = layer.values
            if self.hp["mode"] in ("throttle", "both"):
                p = lp.exp().to(v.dtype)[None, :, :, None]
                sigma = v.detach().float().std(dim=(2, 3), keepdim=True).to(v.dtype)
                eps = torch.randn(v.shape, generator=gen).to(device=v.device, dtype=v.dtype)
                v = p.sqrt() * v + (1 - p).clamp_min(0).sqrt() * sigma * eps
            values.append(v)
        use_bias = self.hp["mode"] in ("bias", "both")

        def bias_fn(module, query, key):
            q_len, kv_len = query.shape[2], key.shape[2]
            n_q = query.shape[1]
            lp = logps[module.layer_idx]
            bias = torch.zeros(1, n_q, q_len, kv_len, dtype=query.dtype, device=query.device)
            if use_bias:
                bias = bias + F.pad(expand_heads(lp, n_q), (0, kv_len - n_ctx))[None, :, None, :].to(query.dtype)
            return bias.masked_fill(~bottom_right_causal(q_len, kv_len, query.device), float("-inf"))

        qa = torch.tensor([batch.qa_ids], device=device)
        pos = torch.arange(n_ctx, n_ctx + len(batch.qa_ids), device=device)[None]
        with attention_masks(modules, bias_fn):
            out = model(input_ids=qa, position_ids=pos, **with_cache(copy_cache(cache, values)), use_cache=True)
        rate = torch.stack(keep_rate).mean()
        aux = {"budget": self.hp["budget_weight"] * (rate - keep_ratio) ** 2}
        return out.logits[0], aux, {"keep": float(rate.detach())}

    default_lr = 0.01

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.params.parameters() if p.requires_grad]

    def checkpoint_hparams(self, method_cfg: dict) -> dict:
        return {**self.hp, "n_sink": self.n_sink, "n_recent": self.n_recent}

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.params.state_dict())
