"""LU-KV ("Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic KV Cache Eviction",
arXiv:2602.08585): per-(layer, KV head) budgets from an offline utility profile (allocator ``lukv``).

The profile (``kvbench-profile``, harness/profile.py: future-utility curves per head, concave envelope,
greedy marginal allocation; the file format: harness/profiles.py) stores, for a grid of keep ratios, the share
of the context each (layer, KV head) keeps. At run time, for keep ratio ``r`` and ``T_l`` tokens in layer ``l``:

* shares are interpolated linearly between the two nearest profiled ratios (toward 1 at ratio 1);
* ideal budgets ``share * T_l`` are rescaled to the exact total and rounded (largest remainders) with every
  head in ``[1, T_l]``: the total is ``sum_l H * n_keep(T_l, r)`` over the whole model for a ``scope=global``
  profile (LU-KV's global allocation: layers trade budget), or ``H * n_keep(T_l, r)`` per layer for a
  ``scope=layer`` profile. The total is therefore the uniform allocator's, exactly.

Within a head the method's scorer picks the entries (conf/method/lukv.yaml: ExpectedAttention with epsilon 0.02,
4 sinks and the last token, as kvpress's ``LUKVPress``).

A profile made for another model is refused with a one-line ``KvbenchError``: here when the number of scored
layers or KV heads differs, and by ``bind_model(model)`` (name and config fingerprint) where the harness
calls it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from harness.compress import Allocator, n_keep, register_allocator, round_to_total
from harness.errors import KvbenchError
from harness.paths import find_input
from harness.profiles import Profile, check_profile_model, load_profile


def resolve_profile(path: str) -> Path:
    """The profile file by the rule of every input file (``harness.paths.find_input``); as given when it is not
    found, so that ``load_profile`` names it in its error."""
    return find_input(path) or Path(path).expanduser()


def lukv_budgets(profile: Profile, n_tokens: list[int], n_heads: int, keep_ratio: float,
                 rule: str = "floor") -> torch.Tensor:
    """Integer budgets ``[L, H]`` for layers of ``n_tokens[l]`` tokens from a profile (totals by the budget rule)."""
    shares = profile.shares(keep_ratio).clamp(min=0.0)  # [L, H]
    sizes = torch.tensor(n_tokens, dtype=torch.float64)[:, None]
    ideal = shares * sizes
    hi = sizes.long().expand(-1, n_heads)
    targets = [n_heads * n_keep(t, keep_ratio, rule) for t in n_tokens]
    if profile.meta.get("scope", "global") == "layer":
        rows = []
        for l, target in enumerate(targets):
            row = ideal[l] * (target / max(float(ideal[l].sum()), 1e-12))
            rows.append(round_to_total(row, target, 1, hi[l]))
        return torch.stack(rows).long()
    total = sum(targets)
    ideal = ideal * (total / max(float(ideal.sum()), 1e-12))
    return round_to_total(ideal, total, 1, hi).reshape(len(n_tokens), n_heads).long()


@register_allocator("lukv")
class LUKVAllocator(Allocator):
    per_head_budgets = True
    per_layer_budgets = True

    def __init__(self, profile: str | None = None):
        if not profile:
            raise KvbenchError(
                "method.allocator=lukv needs a budget profile of this model: make one with "
                "kvbench-profile model=<model> out=<file.safetensors>, then pass method.allocator.profile=<file.safetensors>"
            )
        self.path = resolve_profile(str(profile))
        self.profile = load_profile(self.path)

    def input_files(self) -> dict[str, Path]:
        """The files this part read (the runner fingerprints them so a run dir cannot mix two profiles)."""
        return {"method.allocator.profile": self.path}

    def bind_model(self, model) -> None:
        """Refuse a profile made for another model (one-line KvbenchError)."""
        check_profile_model(self.profile, model, source=f"method.allocator.profile={str(self.path)!r}")

    def budgets(self, scores: list[torch.Tensor], keep_ratio: float) -> torch.Tensor:
        n_heads = scores[0].shape[-2]
        if (len(scores), n_heads) != (self.profile.n_layers, self.profile.n_kv_heads):
            raise KvbenchError(
                f"method.allocator.profile={str(self.path)!r} was profiled for {self.profile.meta.get('model', '?')!r} with "
                f"{self.profile.n_layers} layers x {self.profile.n_kv_heads} KV heads; this run scores "
                f"{len(scores)} layers x {n_heads} KV heads: run kvbench-profile for this model"
            )
        return lukv_budgets(self.profile, [int(s.shape[-1]) for s in scores], n_heads, keep_ratio, self.budget_rule)
