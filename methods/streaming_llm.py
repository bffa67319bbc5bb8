"""StreamingLLM (Xiao et al., 2023): keep the first ``n_sink`` tokens (attention sinks) and the most recent ones.

The score is the position, so top-k takes the latest tokens; the selector's ``n_sink`` (default 4, as the
paper and kvpress) protects the sinks inside the budget.
"""
import torch

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer


@register_scorer("streaming_llm")
class StreamingLLMScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        batch, n_kv, n_tokens, _ = inputs.keys.shape
        positions = torch.arange(n_tokens, device=inputs.keys.device, dtype=torch.float32)
        return positions.expand(batch, n_kv, n_tokens)
