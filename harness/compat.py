"""transformers 5.x renamed the model's cache argument and output field from ``past_key_values`` to ``cache``
(the old name still works in the versions we allow but warns on every run, and goes away in 5.40). One place
decides which name the installed version takes, so the rest of the code works on all of ``>=5.0,<5.40``."""
from __future__ import annotations

import inspect

from transformers import LlamaForCausalLM

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def with_cache(cache) -> dict:
    """Keyword arguments that hand ``cache`` to a model's forward: ``model(..., **with_cache(cache))``."""
    return {CACHE_ARG: cache}


def cache_of(out):
    """The cache a model's forward returned."""
    return getattr(out, CACHE_ARG)
