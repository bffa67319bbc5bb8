"""Knorm (Devoto et al., 2024): keys with a small L2 norm draw more attention, so score = -||k||."""
import torch

from harness.compress import LayerInputs, Scorer, register_scorer


@register_scorer("knorm")
class KnormScorer(Scorer):
    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
