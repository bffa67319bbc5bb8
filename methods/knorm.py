"""Knorm (Devoto et al., 2024): keys with a small L2 norm draw more attention, so score = -||k||."""
import torch

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer


@register_scorer("knorm")
class KnormScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
