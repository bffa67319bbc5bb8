"""TOVA (Oren et al., 2024): the attention the last query gives each token, averaged over all heads of the
layer, so every KV head of a layer keeps the same tokens."""
import torch

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer
from methods._attention import attention_probs


@register_scorer("tova")
class TOVAScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        n_tokens = inputs.keys.shape[2]
        probs = attention_probs(inputs.queries[:, :, -1:], inputs.keys, inputs.scaling, n_tokens - 1)
        mean = probs[:, :, 0].mean(dim=1, keepdim=True)  # [B, 1, T]: average over every query head
        return mean.expand(-1, inputs.keys.shape[1], -1)
