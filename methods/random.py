"""Random eviction: every token gets a random score, so each head keeps a uniformly random subset.

The floor any method must beat. Randomness comes from the generator the harness seeds per (seed, layer),
so the same seed keeps the same entries.
"""
import torch

from harness.compress import LayerInputs, Scorer, register_scorer


@register_scorer("random")
class RandomScorer(Scorer):
    def score(self, inputs: LayerInputs) -> torch.Tensor:
        batch, n_kv, n_tokens, _ = inputs.keys.shape
        return torch.rand(batch, n_kv, n_tokens, generator=inputs.generator).to(inputs.keys.device)
