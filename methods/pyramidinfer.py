"""PyramidInfer (Yang et al., ACL Findings 2024, arXiv 2405.12532): the tokens that go on to the next layer shrink
after every layer during the prefill, chosen by the attention of the recent tokens, so each layer computes and caches
fewer keys and values than the one before (a pyramid).

Official code: mutonix/pyramidinfer @ 61ac641 (``models/modeling_llama_pyramidinfer.py``, ``LlamaModel.forward``'s
prefilling stage; ``configs/*.json``), run as a baseline by ASL (TANIGUCHIREI/ASL @ 9e1ec0c,
``baseline/pyramidinfer``, ``configs/llama3.1_8b.json``) and FastKV (dongwonjo/FastKV @ b9787691,
``baselines/pyramidinfer``, ``profile_pyramidinfer.py``). With ``R = int(T * recent_ratio)`` fixed by the prompt
length ``T``, the last ``R + 1`` tokens (the recent window, always kept) observe; after layer ``l``:

* PvC scores: the layer's softmax attention averaged over its query heads, the recent rows onto the tokens before
  them, weighted by ``linspace(1, distance_weight, R + 1)`` over the rows (closer to the end, more weight) and
  averaged over them; the first ``sink_len`` tokens forced in (``pvc_scores``);
* with ``s(l) = (1 - d) * (cos(pi * l / L) + 1) / 2 + d`` (the ``cosine`` strategy every config uses; ``d`` the
  decay ratio) and ``c`` the context tokens layer ``l`` holds (all but the recent window): when
  ``l % downsample_interval == 0``, ``c > m`` and ``s(l) < 1``, the top ``int(c * s(l))`` context tokens go on, in
  prompt order, unless that is ``<= m`` (then all of them), ``m = min(min_context, T - 1 - R)``
  (``token_counts``); the recent window always goes on;
* the next layer computes and caches only those tokens, at their original positions (``methods._layerwise``).

The counts depend only on ``T``, ``L`` and the parameters, so the whole pyramid is known before the prefill.

**Budget** (``budget_plan``). PyramidInfer's KV compression is the total over layers (FastKV's
``profile_pyramidinfer.py`` measures ``retain_rate`` = mean over layers of the cached length / ``T``), so a keep
ratio means ``sum_l cache(l) <= L * B``, ``B = n_keep(T, keep)``. ``decay_ratio: null`` (the default) takes the
decay ratio ``d`` on a 0.001 grid of ``[0, 1]`` whose pyramid caches the most without exceeding ``L * B``: no cut,
each layer's cache is exactly what reached it. Below what the schedule can reach (its early layers keep almost
everything, layers 0 and 1 all of it: with recent 0.2 no ``d`` goes under 47 % on 32 layers, 86 % on 4),
the steepest pyramid (``d = 0``) is run and each layer's cache is cut to its share of ``L * B``, in proportion to
the tokens it processed (``round_to_total``), keeping the last ``min(R + 1, share)`` tokens and the context tokens
with the best PvC scores of that layer (rows: ``pyramidinfer_scaled: true``). A fixed ``decay_ratio`` (the
configs' 0.9 for Llama-3-8B) runs that pyramid and cuts it the same way only where it holds more than ``L * B``.

Defaults, from every official config: ``recent_ratio 0.2``, ``min_context 64``, ``sink_len 4``,
``distance_weight 1.2``. Depth: the schedule runs over ``l / L``, so it scales with the model by itself; the
downsampling interval is 1 for the 32-layer 7B/8B configs, 2 for Llama-2-13B's 40 layers and 3 for the 80-layer
70B configs, i.e. ``ceil(L / 32)`` (``downsample_interval: null``; ASL's Qwen2.5-14B config, 48 layers, uses 1).

Rows record ``pyramidinfer_decay`` (the ``d`` run), ``pyramidinfer_recent`` (``R + 1``), ``pyramidinfer_layers``
(the layers after which fewer tokens went on), ``pyramidinfer_tokens_by_layer`` (tokens each layer processed),
``pyramidinfer_kept_by_layer`` (each layer's cache) and ``pyramidinfer_scaled``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from harness.compress import LayerInputs, n_keep, register_scorer, round_to_total
from harness.errors import KvbenchError
from harness.schema import Count, Fraction, NonNegative, NonNegativeFloat
from methods._attention import attention_probs
from methods._layerwise import LayerwisePrefill, LayerwiseScorer

REF_LAYERS_PER_INTERVAL = 32  # mutonix/pyramidinfer configs: interval 1 at 32 layers, 2 at 40, 3 at 80
DECAY_GRID = 1000  # the decay ratio is solved on multiples of 1 / DECAY_GRID


def default_interval(n_layers: int) -> int:
    return max(1, math.ceil(n_layers / REF_LAYERS_PER_INTERVAL))


def decay_schedule(layer: int, n_layers: int, decay: float) -> float:
    """``s(l)``, the share of the context that goes on after ``layer`` (the official ``cosine`` strategy, the same
    floating-point expression)."""
    return (1.0 - decay) * (math.cos(math.pi * layer / n_layers) + 1) / 2 + decay


def n_recent_of(n_tokens: int, recent_ratio: float) -> int:
    """``R + 1``: the recent window (the last token and ``int(T * recent_ratio)`` before it), at most ``T``."""
    return min(n_tokens, int(n_tokens * recent_ratio) + 1)


def token_counts(n_tokens: int, n_layers: int, decay: float, recent_ratio: float, min_context: int,
                 interval: int) -> list[int]:
    """Tokens each layer processes (and caches) with the official prefilling schedule."""
    n_recent = n_recent_of(n_tokens, recent_ratio)
    context = n_tokens - n_recent
    floor = min(min_context, n_tokens - n_recent)  # official: min(min_context_length, T - 1 - R)
    counts = []
    for layer in range(n_layers):
        counts.append(context + n_recent)
        share = decay_schedule(layer, n_layers, decay)
        if layer % interval == 0 and context > floor and share < 1.0:
            k = int(context * share)
            if k > floor:
                context = k
    return counts


@dataclass(frozen=True)
class BudgetPlan:
    decay: float
    counts: list[int]  # tokens each layer processes
    kept: list[int]  # each layer's cache after the prefill (= counts where nothing is cut)
    scaled: bool  # the caches were cut to fit the budget


def budget_plan(n_tokens: int, n_layers: int, budget: int, decay: float | None, recent_ratio: float,
                min_context: int, interval: int) -> BudgetPlan:
    """The pyramid for a prompt and a per-layer budget ``B``, the total cache at most ``n_layers * B`` (see the
    module docstring)."""
    total = n_layers * budget
    args = (n_tokens, n_layers)
    rest = (recent_ratio, min_context, interval)
    if decay is None:
        best: tuple[int, float, list[int]] | None = None
        for step in range(DECAY_GRID, -1, -1):  # from the largest d: ties keep the gentler pyramid
            d = step / DECAY_GRID
            counts = token_counts(*args, d, *rest)
            held = sum(counts)
            if held <= total and (best is None or held > best[0]):
                best = (held, d, counts)
        if best is not None:
            return BudgetPlan(best[1], best[2], best[2], False)
        decay = 0.0
    counts = token_counts(*args, decay, *rest)
    if sum(counts) <= total:
        return BudgetPlan(decay, counts, counts, False)
    ideal = torch.tensor(counts, dtype=torch.float64) * (total / sum(counts))
    kept = round_to_total(ideal, total, 1, torch.tensor(counts)).tolist()
    return BudgetPlan(decay, counts, kept, True)


def pvc_scores(queries: Tensor, keys: Tensor, scaling: float, n_recent: int, distance_weight: float,
               sink_len: int, chunk_elems: int = 1 << 26) -> Tensor:
    """``[T - n_recent]`` PvC scores of the tokens before the recent window: the attention of the last ``n_recent``
    queries, averaged over the query heads, weighted by ``linspace(1, distance_weight, n_recent)`` over the queries
    and averaged over them; the first ``sink_len`` tokens at the float32 maximum (always kept). In query chunks."""
    batch, n_heads, _, _ = queries.shape
    n_tokens = keys.shape[2]
    n_ctx = n_tokens - n_recent
    weights = torch.linspace(1.0, distance_weight, n_recent, device=keys.device)
    total = torch.zeros(n_tokens, device=keys.device)
    chunk = max(1, chunk_elems // max(1, batch * n_heads * n_tokens))
    recent = queries[:, :, n_ctx:]
    for start in range(0, n_recent, chunk):
        probs = attention_probs(recent[:, :, start : start + chunk], keys, scaling, n_ctx + start)  # [B, H, c, T]
        total += (probs[0].mean(dim=0) * weights[start : start + chunk, None]).sum(dim=0)
    scores = total[:n_ctx] / n_recent
    scores[: min(sink_len, n_ctx)] = torch.finfo(scores.dtype).max
    return scores


def keep_best(scores: Tensor, n_context: int, n_held: int, n_recent: int, device) -> Tensor:
    """Indices (among a layer's ``n_held`` tokens, ascending) of the top ``n_context`` context tokens by ``scores``
    and the last ``n_recent`` tokens."""
    top = scores.topk(n_context).indices.sort().values if n_context > 0 else torch.zeros(0, dtype=torch.long,
                                                                                         device=device)
    return torch.cat([top.to(device), torch.arange(n_held - n_recent, n_held, device=device)])


@register_scorer("pyramidinfer")
class PyramidInferScorer(LayerwiseScorer):
    shares_across_ratios = False  # the prefill itself depends on the budget

    def varies_layer_counts(self, keep_ratio: float) -> bool:
        return True  # the pyramid: deeper layers cache fewer entries

    def __init__(self, decay_ratio: Fraction | None = None, recent_ratio: Fraction = 0.2, min_context: NonNegative = 64,
                 downsample_interval: Count | None = None, sink_len: NonNegative = 4,
                 distance_weight: NonNegativeFloat = 1.2):
        self.decay_ratio = None if decay_ratio is None else float(decay_ratio)
        self.recent_ratio, self.min_context = float(recent_ratio), int(min_context)
        self.downsample_interval = None if downsample_interval is None else int(downsample_interval)
        self.sink_len, self.distance_weight = int(sink_len), float(distance_weight)
        self.layerwise = LayerwisePrefill("pyramidinfer")
        self._reset(1.0)

    def _reset(self, keep_ratio: float) -> None:
        self.keep_ratio = keep_ratio
        self.plan: BudgetPlan | None = None
        self.n_recent = 0
        self.shrunk_after: list[int] = []

    def interval(self, n_layers: int) -> int:
        return default_interval(n_layers) if self.downsample_interval is None else self.downsample_interval

    def score(self, inputs: LayerInputs) -> Tensor | None:
        if not self.layerwise.active:
            raise KvbenchError("method pyramidinfer needs its prefill_patch (harness.pipeline.prefill enters it)")
        layer, n_layers, held = inputs.layer_idx, inputs.n_layers, inputs.keys.shape[2]
        if layer == 0:
            budget = n_keep(held, self.keep_ratio, self.budget_rule)
            self.n_recent = n_recent_of(held, self.recent_ratio)
            self.plan = budget_plan(held, n_layers, budget, self.decay_ratio, self.recent_ratio, self.min_context,
                                    self.interval(n_layers))
        plan = self.plan
        if held != plan.counts[layer]:  # pragma: no cover - the hooks and the plan disagree
            raise RuntimeError(f"pyramidinfer: layer {layer} holds {held} tokens, its plan {plan.counts[layer]}")
        going_on = plan.counts[layer + 1] if layer + 1 < n_layers else held
        cached = plan.kept[layer]
        if going_on == held and cached == held:
            return None
        scores = pvc_scores(inputs.queries, inputs.keys, inputs.scaling, self.n_recent, self.distance_weight,
                            self.sink_len)
        tokens, device = self.layerwise.layer_tokens(layer), inputs.keys.device
        if cached < held:  # the budget's share of this layer: the best PvC tokens and the recent ones
            recent = min(self.n_recent, cached)
            self.layerwise.cut_cache(layer, tokens[keep_best(scores, cached - recent, held, recent, device)])
        if going_on < held:
            nxt = keep_best(scores, going_on - self.n_recent, held, self.n_recent, device)
            self.layerwise.propagate(layer, tokens[nxt])
            self.shrunk_after.append(layer)
        return None

    def row_extras(self) -> dict[str, Any]:
        plan = self.plan
        if plan is None:
            return {}
        return {"pyramidinfer_decay": plan.decay, "pyramidinfer_recent": self.n_recent,
                "pyramidinfer_layers": list(self.shrunk_after), "pyramidinfer_tokens_by_layer": list(plan.counts),
                "pyramidinfer_kept_by_layer": list(plan.kept), "pyramidinfer_scaled": plan.scaled}
