"""What merging methods share (``cam``, ``merging``): a wrapped base scorer (``harness.compress.WrappedScorer``:
``method.scorer.base=<scorer>``, ``method.scorer.base.<key>=<value>``) chooses what is kept, and the method's
``merge`` (the extension point ``harness.compress.Scorer.merge``) folds the evicted entries into the kept ones
before the cache is cut. The method config's selector (sinks, recent window) applies as to any scorer.
"""
from __future__ import annotations

from torch import Tensor


def heads_of(kept: Tensor | list[Tensor]) -> list[Tensor]:
    """A layer's kept indices (``[H, b]`` or one tensor per head) as one sorted 1-D tensor per head."""
    return list(kept.unbind(0)) if isinstance(kept, Tensor) else list(kept)


def evicted_of(kept: Tensor, n_tokens: int) -> Tensor:
    """The positions ``0..n_tokens-1`` not in ``kept``, ascending."""
    mask = kept.new_ones(n_tokens, dtype=bool)
    mask[kept] = False
    return mask.nonzero().squeeze(-1)
