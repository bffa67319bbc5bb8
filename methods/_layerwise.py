"""Layer-wise prefill: deeper decoder layers compute and cache only some of the prompt's tokens (ASL, FastKV,
PyramidInfer; docs/layerwise.md).

``LayerwisePrefill`` is the bookkeeping one prefill of such a method needs, shared by the scorers:

* ``propagate(layer, idx)``: from ``layer + 1`` on, only the tokens ``idx`` (original prompt positions, sorted, a
  subset of what ``layer`` processes) go on. Called from a scorer's ``score`` at ``layer``; a later call at a
  deeper layer shrinks the set again (PyramidInfer shrinks it after every layer, ASL and FastKV once).
* ``hooks(model)``: the context manager a scorer's ``prefill_patch`` enters. It installs a forward pre-hook on
  every decoder layer that shortens the layer's inputs to its tokens: ``hidden_states`` (the previous layer's
  output, indexed relative to the previous layer's tokens), and the full-length ``position_embeddings`` (cos,
  sin), ``position_ids``, ``cache_position`` and any 4-D attention mask (indexed by original position), so the
  kept tokens keep their original positions (RoPE). The hooks go away and the state is cleared on exit, errors
  included.
* ``cut_cache(layer, idx)``: the layer's cache keeps only ``idx`` (original positions among the layer's tokens;
  ``[S]`` shared by the KV heads, or ``[H_kv, S]`` per head), right after the layer's attention read it whole.
* ``query_rows(layer)``: at a layer that propagates, the rows (indices among the layer's tokens) whose attention
  output is still read; the others' hidden states are dropped before the next layer.
* ``prefill_kept()``: per layer, the original positions its cache holds (``Scorer.prefill_kept``).

The last prompt token must stay in every propagated set (each method keeps its recent window), so the prefill's
``logits_to_keep=1`` still gives that token's logits.

Also here: ``scaled_layer`` (a paper's layer index on a 32-layer model, scaled to another depth) and
``window_token_scores`` (the one-score-per-token ranking ASL and FastKV select the propagated tokens by).
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from harness.compress import LayerInputs, Scorer
from harness.errors import KvbenchError
from methods._attention import attention_probs, pool_scores


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def scaled_layer(ref_layer: int, ref_depth: int, n_layers: int) -> int:
    """``ref_layer`` of a ``ref_depth``-layer model at the same relative depth of an ``n_layers`` model:
    ``min(n_layers - 1, round_half_up(ref_layer / ref_depth * n_layers))``."""
    return max(0, min(n_layers - 1, round_half_up(ref_layer / ref_depth * n_layers)))


def window_token_scores(inputs: LayerInputs, window: int, kernel: int, pool: str, probs: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """``([T - w], probs)``: the softmax attention of the last ``w = min(window, T)`` queries onto each token before
    them, summed over those queries, pooled along the sequence by ``kernel`` (``pool_scores``), and summed over all
    query heads: one score per token, since a propagated token is one hidden state for every head (FastKV's
    ``attn_cache.sum(dim=-2)`` over the KV heads of the GQA-group sums; ASL's ``pooled_attn.sum``). ``probs`` is
    the window attention ``attention_probs`` gives (computed here when not passed), for the caller's SnapKV."""
    n_tokens = inputs.keys.shape[2]
    w = min(window, n_tokens)
    if probs is None:
        probs = attention_probs(inputs.queries[:, :, -w:], inputs.keys, inputs.scaling, n_tokens - w)
    past = probs[:, :, :, : n_tokens - w].sum(dim=2)  # [B, H_q, T - w]
    return pool_scores(past, kernel, pool).sum(dim=1)[0], probs


def _index_seq(t: Tensor, idx: Tensor, n_tokens: int, dim: int) -> Tensor:
    """``t`` indexed along ``dim`` when it spans the whole prompt there (the model's full-length inputs)."""
    return t.index_select(dim, idx.to(t.device)) if t.shape[dim] == n_tokens else t


class LayerwisePrefill:
    """Which tokens each decoder layer of one prefill processes and caches, and the hooks that make it so."""

    def __init__(self, method: str):
        self.method = method  # named in errors
        self.active = False
        self._clear(0)

    def _clear(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.n_tokens = 0  # the prompt's length, read from layer 0's input
        self.cache = None  # the prefill's DynamicCache, captured by layer 0's pre-hook
        # per layer: original positions of the tokens it processes (None = the whole prompt)
        self.tokens: list[Tensor | None] = [None] * n_layers
        self._set_start = [0] * n_layers  # the first layer of the token set each layer processes
        self._device: torch.device | None = None
        self._entry: dict[int, Tensor] = {}  # layer -> indices of its tokens among the previous layer's
        self._rows: dict[int, Tensor] = {}  # propagating layer -> indices of the next layer's tokens among its own
        self._cut: dict[int, Tensor] = {}  # layer -> original positions its cache was cut to ([1, S] or [H, S])
        self._pe: dict[int, tuple[Tensor, ...]] = {}  # first layer of a token set -> its shortened (cos, sin)

    # ---- what a scorer calls during the prefill ------------------------------------------------------------
    def layer_tokens(self, layer: int) -> Tensor:
        """Original positions of the tokens ``layer`` processes (``arange(T)`` for the whole prompt)."""
        held = self.tokens[layer]
        return torch.arange(self.n_tokens, device=self._device) if held is None else held

    def propagate(self, layer: int, idx: Tensor) -> None:
        """From ``layer + 1`` on, only ``idx`` (original positions, sorted, among ``layer``'s tokens) are processed.
        At the last layer only the query rows are cut (only the last token's output is read after it)."""
        current = self.layer_tokens(layer)
        idx = idx.to(current.device).long()
        rel = torch.searchsorted(current, idx)
        if idx.numel() == 0 or bool((rel >= current.numel()).any()) or not torch.equal(current[rel], idx):
            raise ValueError(f"{self.method}: propagated tokens must be sorted positions among layer {layer}'s")
        if self.n_tokens - 1 not in idx[-1:].tolist():
            raise ValueError(f"{self.method}: the last prompt token must go on (its logits start decoding)")
        self._rows[layer] = rel
        if layer + 1 >= self.n_layers:
            return
        self._entry[layer + 1] = rel
        for deeper in range(layer + 1, self.n_layers):
            self.tokens[deeper] = idx
            self._set_start[deeper] = layer + 1
            if deeper > layer + 1:
                self._entry.pop(deeper, None)

    def query_rows(self, layer: int) -> Tensor | None:
        """Rows of ``layer``'s queries (indices among its tokens) whose attention output is still read: those
        that go on, where the layer propagates fewer tokens than it holds; else None (all)."""
        rows = self._rows.get(layer)
        return None if rows is None or rows.numel() == self.processed()[layer] else rows

    def cut_cache(self, layer: int, idx: Tensor) -> None:
        """``layer``'s cache keeps only ``idx``: original positions among its tokens, ``[S]`` for every KV head or
        ``[H_kv, S]`` per head (same count per head), each row sorted."""
        current = self.layer_tokens(layer)
        cache_layer = self.cache.layers[layer]
        idx = idx.to(current.device).long()
        rel = torch.searchsorted(current, idx)
        if bool((rel >= current.numel()).any()) or not torch.equal(current[rel], idx):
            raise ValueError(f"{self.method}: layer {layer}'s cache cut names tokens it does not hold")
        if rel.dim() == 1:
            cache_layer.keys = cache_layer.keys.index_select(2, rel)
            cache_layer.values = cache_layer.values.index_select(2, rel)
            self._cut[layer] = idx[None]
        else:
            gather = rel[None, :, :, None].expand(cache_layer.keys.shape[0], -1, -1, cache_layer.keys.shape[-1])
            cache_layer.keys = cache_layer.keys.gather(2, gather)
            cache_layer.values = cache_layer.values.gather(2, gather)
            self._cut[layer] = idx

    def prefill_kept(self) -> list[Tensor | None]:
        """Per layer, the original positions its cache holds (``[1, S]`` shared by the KV heads, or ``[H_kv, S]``
        after a per-head ``cut_cache``), None where it holds the whole prompt."""
        out: list[Tensor | None] = []
        for layer in range(self.n_layers):
            if layer in self._cut:
                out.append(self._cut[layer])
            else:
                held = self.tokens[layer]
                out.append(None if held is None else held[None])
        return out

    def processed(self) -> list[int]:
        """Per layer, how many tokens it processed (the prompt length where it saw all of them)."""
        return [self.n_tokens if t is None else int(t.numel()) for t in self.tokens]

    # ---- the hooks ------------------------------------------------------------------------------------------
    def _pre_hook(self, layer: int, module, args, kwargs):
        if layer == 0:
            # transformers >= 5.2x hands decoder layers the cache as ``cache``; earlier 5.x as ``past_key_values``
            self.cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if self.cache is None:
                raise KvbenchError(f"method {self.method} needs use_cache=True during prefill")
            hidden = args[0] if args else kwargs["hidden_states"]
            self.n_tokens, self._device = int(hidden.shape[1]), hidden.device
        idx = self.tokens[layer]
        if idx is None:
            return None
        n = self.n_tokens
        entry = self._entry.get(layer)
        if entry is not None:  # the previous layer's output, its tokens, to this layer's
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.index_select(1, entry.to(hidden.device))
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            first = self._set_start[layer]
            if first not in self._pe:
                self._pe[first] = tuple(_index_seq(t, idx, n, 1) for t in pe)
            kwargs["position_embeddings"] = self._pe[first]
        pos = kwargs.get("position_ids")
        if isinstance(pos, Tensor):
            kwargs["position_ids"] = _index_seq(pos, idx, n, pos.dim() - 1)
        cpos = kwargs.get("cache_position")
        if isinstance(cpos, Tensor):
            kwargs["cache_position"] = _index_seq(cpos, idx, n, cpos.dim() - 1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 4:
            kwargs["attention_mask"] = _index_seq(_index_seq(mask, idx, n, 2), idx, n, 3)
        elif mask is not None and not isinstance(mask, Tensor):
            raise KvbenchError(f"method {self.method} cannot shorten an attention mask of type {type(mask).__name__}")
        return args, kwargs

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator["LayerwisePrefill"]:
        """Pre-hooks on every decoder layer for one prefill; state cleared at entry and exit."""
        layers = list(getattr(getattr(model, "model", model), "layers"))
        self._clear(len(layers))
        self.active = True
        handles = []
        try:
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_pre_hook(functools.partial(self._pre_hook, i), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            self.active = False
            self.cache = None
            self._pe = {}


class LayerwiseScorer(Scorer):
    """A scorer whose prefill hands deeper layers fewer tokens (ASL, FastKV, PyramidInfer): ``self.layerwise`` (a
    ``LayerwisePrefill``) installs the decoder-layer pre-hooks and keeps the token sets; ``_reset(keep_ratio)``
    starts a prefill. The extension points the harness calls are answered by it, once for all three."""

    layerwise: LayerwisePrefill
    scores_every_layer = False  # the layers a propagation cut are kept as cut, unscored
    # its scores are its prefill's selection layers' (a cut prefill): nothing to score a decoding cache with
    supports_decoding = False

    def _reset(self, keep_ratio: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def query_rows(self, layer_idx: int) -> Tensor | None:
        """At a propagating layer only the tokens that go on compute attention: the others' hidden states are
        dropped before the next layer, so their outputs would be thrown away (the kept tokens' are unchanged)."""
        return self.layerwise.query_rows(layer_idx)

    @contextmanager
    def prefill_patch(self, model, keep_ratio: float):
        self._reset(keep_ratio)
        with self.layerwise.hooks(model):
            yield self

    def prefill_kept(self) -> list[Tensor | None]:
        """Per layer, the original indices the last prefill already cut the cache to, None where the prefill kept
        every token. ``Method.plan`` sees those layers as kept whole (score None), so diagnostics such as evidence
        retention need these instead."""
        return self.layerwise.prefill_kept()
