"""What merging methods share: a base scorer chooses what is kept, and the method's ``merge`` (the extension point
``harness.compress.Scorer.merge``) folds the evicted entries into the kept ones before the cache is cut.

The base is any registered scorer that only scores (no prefill patch, no early cut of its own), built with its
class defaults; the method config's selector (sinks, recent window) applies to it as to any scorer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from harness.compress import SCORERS, LayerInputs, Scorer, Selector

# Scorers that only score, so that a merging method can select with them (the others change the prefill, cut
# layers early or patch decoding, which a wrapper would have to forward hook by hook).
Base = Literal["streaming_llm", "h2o", "knorm", "keydiff", "snapkv", "tova", "expected_attention", "random"]


def heads_of(kept: Tensor | list[Tensor]) -> list[Tensor]:
    """A layer's kept indices (``[H, b]`` or one tensor per head) as one sorted 1-D tensor per head."""
    return list(kept.unbind(0)) if isinstance(kept, Tensor) else list(kept)


def evicted_of(kept: Tensor, n_tokens: int) -> Tensor:
    """The positions ``0..n_tokens-1`` not in ``kept``, ascending."""
    mask = kept.new_ones(n_tokens, dtype=bool)
    mask[kept] = False
    return mask.nonzero().squeeze(-1)


class MergingScorer(Scorer):
    """Scores of the ``base`` scorer; subclasses implement ``merge``."""

    def __init__(self, base: Base = "streaming_llm"):
        import methods  # the registry fills on import of the method modules

        methods.load_all()
        self.base_name = base
        self.base = SCORERS[base]()
        self.needs_hidden_states = self.base.needs_hidden_states

    def bind_selector(self, selector: Selector) -> None:
        self.base.bind_selector(selector)

    def bind_model(self, model: nn.Module) -> None:
        self.base.bind_model(model)

    def input_files(self) -> dict[str, Path]:
        return self.base.input_files()

    def score(self, inputs: LayerInputs) -> Tensor:
        return self.base.score(inputs)
