"""The hook: an attention function registered with transformers' ``AttentionInterface``.

Why not recompute queries in a forward hook, as kvpress does? Each family prepares queries differently
(Qwen3 applies ``q_norm`` before RoPE; others do not). The attention function receives the exact
post-norm, post-RoPE queries of every stock Llama / Qwen2 / Qwen3 / Mistral model, so scorers need no
per-family code. ``install(model)`` switches the model to this function and gives each attention module a
pointer to the run's ``Hooks``; leaving the context restores the original implementation and removes every
pointer and forward pre-hook (tests check this).

Masks: our name is not in transformers' mask registry, so the model passes ``attention_mask=None`` and we
build the one mask we need here. A prefill has batch size 1 and no padding: prefill is plain causal, one-token
decoding needs no mask, and a multi-token step on a (possibly pruned) cache is causal aligned to the
bottom-right. Samples decoded together (``batch_size``) hold their caches left-padded (``harness.cache.
BatchLayer``), each with its own positions, and their padding is masked here. Positions come from explicit ``position_ids``
passed by the decode loop, so RoPE stays right whatever was evicted.
"""
from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from harness.cache import ChannelKV, PaddedKV, RaggedKV, bottom_right_causal
from harness.compress import Allocator, LayerInputs, Scorer

ATTN_NAME = "kvbench"


def padded_attention(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scaling: float) -> Tensor:
    """One attention call over KV heads of different lengths held left-padded in ``keys`` / ``values``
    ``[B, H_kv, T, D]``, ``mask`` ``[B, H_kv, q_len, T]`` (True = attend; padding False); returns
    ``[B, L, H_q, D]``. Each query head's group reads its KV head directly (``enable_gqa``), with no copy."""
    batch, n_q_heads, q_len, _ = query.shape
    group = n_q_heads // keys.shape[1]
    if group > 1:  # the KV head's mask for each of its query heads
        mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, n_q_heads, q_len, keys.shape[2])
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                                           enable_gqa=group > 1)
    return out.transpose(1, 2).contiguous()


def ragged_attention(query: Tensor, keys: RaggedKV, values: RaggedKV, scaling: float) -> Tensor:
    """Attention when each KV head holds its own number of entries, in one call: the heads are left-padded into
    one tensor for this step (the cache itself stays unpadded, so its bytes are what it keeps) and the padding is
    masked; returns ``[B, L, H_q, D]``."""
    return padded_attention(query, keys.padded(), values.padded(), keys.padded_mask(query.shape[2]), scaling)


# Per attention module: the run's Hooks (set by ``install``) and a method's mask function (``attention_masks``).
# Kept here, keyed weakly by module, rather than as attributes written onto transformers' modules.
_HOOKS: "weakref.WeakKeyDictionary[nn.Module, Hooks]" = weakref.WeakKeyDictionary()
_MASKS: "weakref.WeakKeyDictionary[nn.Module, MaskFn]" = weakref.WeakKeyDictionary()
# ``fn(module, query, key)`` -> a bool mask (True = attend) or an additive float bias broadcastable to
# ``[B, H_q, q_len, kv_len]``, causality included; None = the default mask.
MaskFn = Callable[[nn.Module, Tensor, Tensor], "Tensor | None"]


@contextmanager
def attention_masks(modules: list[nn.Module], fn: MaskFn) -> Iterator[None]:
    """Attention of ``modules`` uses ``fn``'s mask or bias for the duration (SP-KV's gates, LKV's training
    bias); the previous mask functions come back afterwards."""
    previous = {m: _MASKS.get(m) for m in modules}
    for m in modules:
        _MASKS[m] = fn
    try:
        yield
    finally:
        for m, old in previous.items():
            if old is None:
                _MASKS.pop(m, None)
            else:
                _MASKS[m] = old


def channel_attention(query: Tensor, keys: ChannelKV, values: Tensor, scaling: float) -> Tensor:
    """Attention over a layer whose older keys hold only some channels (``harness.cache.ChannelLayer``): their
    logits are the queries' dot products on the same channels of each KV head; returns ``[B, L, H_q, D]``."""
    batch, n_q_heads, q_len, _ = query.shape
    n_kv = keys.full.shape[1]
    group = n_q_heads // n_kv
    mask = bottom_right_causal(q_len, keys.length, query.device) if q_len > 1 else None
    outs = []
    for h in range(n_kv):
        q = query[:, h * group : (h + 1) * group]
        old = q[..., keys.channels[h]] @ keys.pruned[:, h : h + 1].transpose(-1, -2)
        new = q @ keys.full[:, h : h + 1].transpose(-1, -2)
        logits = torch.cat([old, new], dim=-1).float() * scaling
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        outs.append(logits.softmax(dim=-1).to(values.dtype) @ values[:, h : h + 1])
    return torch.cat(outs, dim=1).transpose(1, 2).contiguous()


def kvbench_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    hooks = _HOOKS.get(module)
    if hooks is not None and hooks.decoding is not None:  # compression while decoding: its queries (and keys)
        hooks.decoding.capture(module.layer_idx, query, key, scaling)
    if isinstance(key, RaggedKV):
        return ragged_attention(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5), None
    if isinstance(key, PaddedKV):  # several samples decoded together (harness.pipeline.DecodeBatch)
        if _MASKS.get(module) is not None:
            raise ValueError("a method's attention mask cannot be applied to a batch of samples; run batch_size=1")
        return padded_attention(query, key.states, value, key.mask(query.shape[2]),
                                scaling if scaling is not None else query.shape[-1] ** -0.5), None
    if isinstance(key, ChannelKV):
        return channel_attention(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5), None
    q_len, kv_len = query.shape[2], key.shape[2]
    # A method may set its own mask or additive bias (``attention_masks``). Otherwise: plain prefill and
    # one-token decoding get mask None, exactly what stock sdpa gets (bit-identical outputs), and a multi-token
    # step on a cache gets the bottom-right causal mask.
    mask_fn = _MASKS.get(module)
    mask = mask_fn(module, query, key) if mask_fn is not None else None
    rows = None
    if hooks is not None and hooks.scorer is not None:
        if (hooks.scorer.needs_row_lse and mask is None and q_len == kv_len > 1 and query.device.type == "cpu"
                and not dropout):
            # the prefill's own fused pass also gives each row's log-sum-exp, which the scorer needs
            out, lse = _attention_with_lse(query, key, value, scaling)
            hooks.on_prefill_attention(module, query, key, value, lse)
            return out, None
        # Scoring first: it reads only queries and keys, and may tell us which rows' outputs are still needed.
        hooks.on_prefill_attention(module, query, key, value)
        rows = hooks.scorer.query_rows(module.layer_idx)
    if rows is not None and mask is None and q_len == kv_len:
        return rows_attention(module, query, key, value, rows, dropout, scaling, **kwargs), None
    if mask is None and q_len != 1 and q_len != kv_len:
        mask = bottom_right_causal(q_len, kv_len, query.device)
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return out, None


def _attention_with_lse(query: Tensor, key: Tensor, value: Tensor, scaling: float | None) -> tuple[Tensor, Tensor]:
    """Causal prefill attention ``[B, T, H_q, D]`` with CPU's fused flash kernel, the one stock sdpa dispatches a
    causal float prefill to (the same output, bit for bit, tested), and each query row's log-sum-exp
    ``[B, H_q, T]`` that kernel computes anyway."""
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True,
                                                                           scale=scale)[:2]
    return out.transpose(1, 2).contiguous(), lse


def rows_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, rows: Tensor, dropout, scaling,
                   **kwargs) -> Tensor:
    """Causal prefill attention computed for the query ``rows`` only; the other rows of the ``[B, T, H, D]``
    output are zeros (their tokens' hidden states are dropped after this layer, so nothing reads them)."""
    mask = torch.arange(key.shape[2], device=key.device)[None, :] <= rows[:, None]
    part, _ = sdpa_attention_forward(module, query[:, :, rows], key, value, mask[None, None], dropout=dropout,
                                     scaling=scaling, **kwargs)
    out = part.new_zeros(query.shape[0], query.shape[2], *part.shape[2:])
    out[:, rows] = part
    return out


AttentionInterface.register(ATTN_NAME, kvbench_attention)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    from harness.models import is_attention_module

    mods = [m for m in model.modules() if is_attention_module(m)]
    return sorted(mods, key=lambda m: m.layer_idx)


def stash_hidden(modules: list[nn.Module], store: dict[int, Tensor]) -> list:
    """Forward pre-hooks saving each attention module's input hidden states into ``store[layer]`` (for scorers
    that read them, and learners); returns the handles to remove."""
    def hook(module, args, kwargs):
        store[module.layer_idx] = kwargs.get("hidden_states", args[0] if args else None)

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]


class Hooks:
    """Per-run state shared by the attention modules: the active scorer and what it produced."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = attention_modules(model)
        self.n_layers = len(self.modules)
        self.rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        self.scorer: Scorer | None = None
        self.allocator: Allocator | None = None  # observes each layer's inputs too (Allocator.observe)
        self.scores: list[Tensor | None] = []
        self.hidden: dict[int, Tensor] = {}
        self.score_seconds = 0.0
        self.seed = 0
        self.query_start = 0  # prompt position of the scored queries' first row (harness.pipeline.chunked_prefill)
        # the generation compressing its cache while it decodes (harness.decoding.DecodeCompressor), if any
        self.decoding = None
        self._handles: list = []

    @contextmanager
    def scoring(self, scorer: Scorer | None, seed: int, allocator: Allocator | None = None) -> Iterator["Hooks"]:
        """Score every layer during the prefill run inside this context (and let the method's ``allocator``
        observe the same inputs)."""
        self.scorer, self.seed, self.allocator = scorer, seed, allocator
        self.scores = [None] * self.n_layers
        self.hidden = {}
        self.score_seconds = 0.0
        if scorer is not None and scorer.needs_hidden_states:
            self._handles += stash_hidden(self.modules, self.hidden)
        try:
            yield self
        finally:
            self.scorer = self.allocator = None
            self.hidden = {}
            for h in self._handles:
                h.remove()
            self._handles = []

    def on_prefill_attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             row_lse: Tensor | None = None) -> None:
        start = time.perf_counter()
        layer = module.layer_idx
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + layer)
        inputs = LayerInputs(
            layer_idx=layer,
            n_layers=self.n_layers,
            queries=query,
            keys=key,
            values=value,
            module=module,
            generator=gen,
            hidden_states=self.hidden.get(layer),
            rotary=self.rotary,
            query_start=self.query_start,
            row_lse=row_lse,
        )
        with torch.no_grad():
            scores = self.scorer.score(inputs)
            if self.allocator is not None:
                self.allocator.observe(inputs)
        self.scores[layer] = None if scores is None else scores.float()
        if query.is_cuda:
            torch.cuda.synchronize()
        self.score_seconds += time.perf_counter() - start


@contextmanager
def install(model: nn.Module) -> Iterator[Hooks]:
    """Route the model's attention through ``kvbench_attention`` for the duration of a run."""
    config = model.config
    previous = config._attn_implementation
    hooks = Hooks(model)
    model.set_attn_implementation(ATTN_NAME)
    for m in hooks.modules:
        _HOOKS[m] = hooks
    try:
        yield hooks
    finally:
        for m in hooks.modules:
            _HOOKS.pop(m, None)
        model.set_attn_implementation(previous)
