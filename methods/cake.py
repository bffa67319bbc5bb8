"""CAKE ("CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", Qin et al., ICLR 2025,
arXiv:2503.12491): per-layer budgets from each layer's attention preference (allocator ``cake``, with any scorer)
and CAKE's eviction indicator, attention mean plus its variance over the observation window (scorer ``cake``).

Official code: github.com/antgroup/cakekv, commit c4675ce (``cake/model/modify_llama.py: llama_attn_forward_cake``,
``cake/cake_cache.py: CakeprefillKVCache``, ``cake/utils.py``, ``experiments/LongBench/pred_cake.py``).

* **Preference** of a layer (``layer_preference``; the allocator measures it for every layer through
  ``Allocator.observe``, so it works with any scorer): ``A`` = the attention of the last ``window`` queries
  (causal, softmax over every key) on the keys before the window, all query heads; spatial dispersion
  ``H = -sum A log(A + 1e-10)`` and temporal shift ``V = sum over heads and keys of var_queries(A)``
  (unbiased), both summed over everything; ``P = H^(1/tau1) * V^(1/tau2)``.
* **Budgets** (``cake_budgets``): every layer keeps its window; the rest of the uniform total, ``B = sum_l
  (n_keep(T_l, r) - window)`` per head, is shared as ``P_l / sum P * B`` cut to whole entries and to what a layer
  has (``T_l - window``), what is cut off spread evenly over the layers with room, the remainder to the lowest
  layers first: the official ``adjust_budgets``, pass by pass. The official stops after its two passes and then
  cuts every layer at ``T - window`` again, losing what those passes put above it (its total can fall short);
  kvbench repeats the even spreading until the total is exact. Every head of a layer gets the layer's budget.
* **Cascade** (official ``--cascading``, the README's command): the official prefill re-allocates after every
  layer, sharing the whole total among the layers seen so far, and trims each of them to its new budget at once,
  so the cache never holds more than the total. The scores are fixed when a layer is prefilled, so trimming a
  layer twice keeps the top of what the first trim kept: the cascade ends with each layer holding the *smallest*
  budget any step gave it, which is the last step's budget (the one computed here) except where an earlier
  step's even spreading gave that layer one entry less (then the official total falls short by those entries).
  kvbench allocates once, after the prefill, with every layer's preference: the last step's budgets, exact.
  Peak prefill memory is not modelled (kvbench prefills whole, then prunes).
* **Token scores** (scorer ``cake``): ``mean_q A + gamma * var_q A`` over the window's queries (all keys, then
  the keys before the window), average-pooled over ``kernel`` positions (zeros counted at the edges), averaged
  over each GQA group; the window itself is kept by the selector (``n_recent`` = window).
* **Defaults**: window 32, gamma 200, tau1 = tau2 = 1 (``pred_cake.py``'s argparse; its
  ``config/model2tau.json`` tunes tau per model and cache size, e.g. Llama-3.1-8B: 1.6 / 0.4 at 1024 entries,
  1.6 / 0.6 at 128), kernel 5 (hard-coded in the official code).

Other differences: attention in float32 (the official casts the softmax to the model's dtype); the official skips
eviction when ``T <= cache_size + window`` (keeping more than its budget), kvbench always keeps the ratio's
total; the official decoding-time eviction (each decoded token evicts one by the new query's attention) is not
run: decoded entries are appended, as for every kvbench method.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from harness.compress import Allocator, LayerInputs, Scorer, n_keep, register_allocator, register_scorer
from harness.errors import KvbenchError
from harness.schema import Count, NonNegativeFloat
from methods._attention import attention_probs, per_kv_head, pool_scores

Temperature = Annotated[float, Field(gt=0.0)]
OFFICIAL = {"window": 32, "kernel": 5, "gamma": 200.0, "tau1": 1.0, "tau2": 1.0}  # pred_cake.py, cakekv c4675ce


def window_attention(inputs: LayerInputs, window: int) -> tuple[Tensor, int]:
    """``(probs [B, H_q, w, T], n_prefix)``: the last ``w = min(window, T, queries)`` queries' attention."""
    n_tokens = inputs.keys.shape[2]
    w = min(window, n_tokens, inputs.queries.shape[2])
    n_prefix = n_tokens - w
    return attention_probs(inputs.queries[:, :, -w:], inputs.keys, inputs.scaling, n_prefix), n_prefix


def layer_preference(inputs: LayerInputs, window: int, tau1: float, tau2: float) -> float:
    """``H^(1/tau1) * V^(1/tau2)`` of the window's attention on the keys before it (0 without such keys)."""
    probs, n_prefix = window_attention(inputs, window)
    if n_prefix == 0 or probs.shape[2] < 2:  # no key before the window, or no variance over one query
        return 0.0
    a = probs[..., :n_prefix].double()
    dispersion = -torch.sum(a * torch.log(a + 1e-10))
    shift = torch.var(a, dim=-2).sum()
    return float(dispersion ** (1.0 / tau1) * shift ** (1.0 / tau2))


def spread(budgets: list[int], amount: int, room: list[bool]) -> None:
    """The official even spreading: ``amount // n`` more to each of the ``n`` layers with room, one more to the
    first ``amount % n`` of them (in place; nothing when no layer has room)."""
    chosen = [i for i, ok in enumerate(room) if ok]
    if not chosen or amount == 0:
        return
    each, rest = divmod(amount, len(chosen))
    for rank, i in enumerate(chosen):
        budgets[i] += each + (1 if rank < rest else 0)


def cake_budgets(preferences: list[float], n_tokens: list[int], n_heads: int, keep_ratio: float, window: int,
                 rule: str = "floor") -> Tensor:
    """Budgets ``[L, H]`` (every head of a layer alike) summing to ``H * sum_l n_keep(T_l, keep_ratio)``."""
    per_layer = [n_keep(t, keep_ratio, rule) for t in n_tokens]
    w = min(window, min(per_layer))  # every layer keeps this window beyond its share
    caps = [t - w for t in n_tokens]
    total = sum(b - w for b in per_layer)
    prefs = [max(0.0, float(p)) if p == p else 0.0 for p in preferences]  # NaN (a degenerate layer) as 0
    mass = sum(prefs)
    ideal = [p / mass * total for p in prefs] if mass > 0 else [total / len(prefs)] * len(prefs)
    budgets = [int(x) for x in ideal]  # the official ``np.array(budget_list, dtype=int)``: truncation
    # official pass 1: what passes a layer's cap is spread over the layers below theirs
    excess = sum(max(b - c, 0) for b, c in zip(budgets, caps))
    budgets = [min(b, c) for b, c in zip(budgets, caps)]
    spread(budgets, excess, [b < c for b, c in zip(budgets, caps)])
    # official pass 2: the truncation's shortfall, the same way
    spread(budgets, total - sum(budgets), [b < c for b, c in zip(budgets, caps)])
    # the official stops here and cuts at the caps; kvbench spreads again until the total is exact
    while True:
        budgets = [min(b, c) for b, c in zip(budgets, caps)]
        short = total - sum(budgets)
        room = [b < c for b, c in zip(budgets, caps)]
        if short <= 0 or not any(room):
            break
        spread(budgets, short, room)
    return torch.tensor([[b + w] * n_heads for b in budgets], dtype=torch.long)


@register_allocator("cake")
class CakeAllocator(Allocator):
    per_layer_budgets = True
    needs_every_layer = True  # a budget for every layer from what it measured there

    def __init__(self, window: Count = OFFICIAL["window"], tau1: Temperature = OFFICIAL["tau1"],
                 tau2: Temperature = OFFICIAL["tau2"]):
        self.window, self.tau1, self.tau2 = int(window), float(tau1), float(tau2)
        if self.window < 1 or not (self.tau1 > 0 and self.tau2 > 0):
            raise KvbenchError(f"method.allocator: window={window} must be >= 1 and tau1={tau1}, tau2={tau2} > 0 "
                               "(CAKE's observation window and preference temperatures)")
        self.preferences: dict[int, float] = {}

    def observe(self, inputs: LayerInputs) -> None:
        if inputs.layer_idx == 0:  # a new prefill
            self.preferences = {}
        self.preferences[inputs.layer_idx] = layer_preference(inputs, self.window, self.tau1, self.tau2)

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:
        if len(self.preferences) != len(scores):
            raise KvbenchError(f"method.allocator=cake measured the preference of {len(self.preferences)} layers but "
                               f"{len(scores)} were scored (it needs every layer scored, in one prefill)")
        prefs = [self.preferences[i] for i in sorted(self.preferences)]
        return cake_budgets(prefs, [int(s.shape[-1]) for s in scores], scores[0].shape[-2], keep_ratio,
                            self.window, self.budget_rule)


@register_scorer("cake")
class CakeScorer(Scorer):
    """CAKE's eviction indicator: the window's mean attention plus ``gamma`` times its variance, pooled."""

    def __init__(self, window: Count = OFFICIAL["window"], kernel: Count = OFFICIAL["kernel"],
                 gamma: NonNegativeFloat = OFFICIAL["gamma"]):
        self.window, self.kernel, self.gamma = int(window), int(kernel), float(gamma)

    def score(self, inputs: LayerInputs) -> Tensor:
        probs, n_prefix = window_attention(inputs, self.window)
        batch, n_kv, n_tokens = inputs.keys.shape[0], inputs.keys.shape[1], inputs.keys.shape[2]
        if n_prefix == 0:
            return torch.zeros(batch, n_kv, n_tokens, device=inputs.keys.device)
        variance = probs.var(dim=-2) if probs.shape[2] > 1 else torch.zeros_like(probs[:, :, 0])
        scores = (probs.mean(dim=-2) + self.gamma * variance)[..., :n_prefix]
        scores = per_kv_head(pool_scores(scores, self.kernel, "avg")[..., :n_prefix], n_kv)  # an even kernel adds one
        return F.pad(scores, (0, n_tokens - n_prefix), value=0.0)
