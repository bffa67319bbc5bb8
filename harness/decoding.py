"""Compression while decoding: the cache cut back to a target size every few generated tokens.

Everything else in kvbench compresses once, after the prefill. Reasoning models write thousands of tokens, and
there the cache grows with the generation; ``decoding.mode`` adds kvpress's ``DecodingPress`` semantics for any
scorer (``conf/config.yaml``, ``decoding:``):

* ``prefill`` (the default): compressed once after the prefill, the cache then grows with every token.
* ``decode``: the prefill is kept whole; every ``compression_interval`` decoding steps the cache is cut to
  ``target_size`` entries per KV head (kvpress's ``DecodingPress``).
* ``both``: the prefill is compressed at the run's keep ratio (at most ``target_size`` entries), then decoding
  compresses as ``decode`` does (kvpress's ``PrefillDecodingPress``).

``target_size`` null: the prefill's budget at the keep ratio (``n_keep(prompt, keep_ratio)``), so a keep-ratio
sweep sweeps the decoding budget too.

The interval counts the entries written since the last cut: one per generated token (kvpress counts forwards,
which is the same for one-token steps), and the question fed after a query-agnostic prefill counts its length
(kvpress counts it as one step), so the cache holds at most ``target_size + compression_interval`` entries per head
before each cut when the question is no longer than the interval. After the step that reaches
``compression_interval`` (or a step with at least ``target_size`` tokens, as kvpress), every layer holding more
than the target is scored by the
method's scorer -- ``Scorer.decode_score``, by default its prefill ``score`` with the queries of the steps since the
last compression (at most ``query_buffer``) as the queries and the whole cache as the keys, which is what
SnapKV's observation window, TOVA's last query or Knorm's keys need -- and each head keeps its top ``target``
entries with the selector's sinks and recent tokens protected, in cache order. The whole layer is cut after the
forward that triggered it; kvpress cuts each layer in that forward's attention hook, right after the layer's
attention, which gives the same caches (a layer's cut does not change the other layers' outputs of that step).

The window queries are the ones the model really attended with, rotated at their own positions
(``query_positions: own``). kvpress re-projects its buffered hidden states and rotates every one of them at the
current step's position (``SnapKVPress.compute_window_attention`` gets that step's ``position_embeddings``);
``query_positions: last`` does the same, for conformance with it.

Every row records the cache at each compression (``kv_footprint``: one point after the prefill and the question,
one before and one after each cut, one at the end), the mean footprint over the generation and the decode speed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from harness.cache import RaggedLayer, _dense_layer, cache_bytes, kept_per_head, prune_layer, rotate_by
from harness.compress import DecodingPlan, LayerInputs, Method
from harness.footprint import mean_footprint


def footprint_point(cache, generated: int) -> dict:
    """The cache's size now: mean and largest entries per (layer, KV head), and bytes."""
    per_head = [n for layer in kept_per_head(cache) for n in layer]
    return {"generated": int(generated), "entries_mean": sum(per_head) / max(1, len(per_head)),
            "entries_max": max(per_head, default=0), "bytes": cache_bytes(cache)}


@dataclass
class DecodeCompressor:
    """One generation's decode-time compression: captures each layer's queries (``harness.attention`` calls
    ``capture``), counts steps (``harness.pipeline.decode`` calls ``begin`` once, then ``after_step`` after every
    forward), cuts the cache and records the footprint."""

    method: Method
    plan: DecodingPlan
    target: int
    modules: list
    cache: object
    seed: int
    rotary: object = None
    queries: dict[int, list[Tensor]] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)  # the buffered queries' positions, in order
    steps: int = 0  # entries written per head since the last compression
    generated: int = 0  # generated tokens fed back so far (each adds one entry per head)
    compressions: int = 0
    footprint: list[dict] = field(default_factory=list)

    def capture(self, layer_idx: int, query: Tensor, key, scaling: float | None) -> None:
        """The ``[B, H_q, q, D]`` post-RoPE queries one layer attended with in the current step, and its cache's
        keys and the attention's scaling (for an online scorer)."""
        self.queries.setdefault(layer_idx, []).append(query)
        self.method.scorer.decode_step(layer_idx, query, key,
                                       scaling if scaling is not None else query.shape[-1] ** -0.5)

    def after_step(self, first_position: int, n_tokens: int, question: bool = False) -> None:
        """Called after every decoding forward (``n_tokens`` fed from ``first_position``; ``question``: the
        question fed after a query-agnostic prefill, which is no generated token however long)."""
        if not question:
            self.generated += n_tokens
        if not self.plan.compresses_decoding:  # a growing cache: only its footprint is recorded
            return
        self.positions.extend(range(first_position, first_position + n_tokens))
        self.steps += n_tokens
        if self.steps < self.plan.compression_interval and n_tokens < self.target:
            self._trim()
            return
        held = max(n for layer in kept_per_head(self.cache) for n in layer)
        if held > self.target:
            before = footprint_point(self.cache, self.generated)
            if before != self.footprint[-1]:  # a question step that triggers a cut: its point is the one before it
                self.footprint.append(before)
            self._compress(first_position + n_tokens - 1)
            self.footprint.append(footprint_point(self.cache, self.generated))
            self.compressions += 1
        self.queries, self.positions, self.steps = {}, [], 0  # kvpress clears its buffer at every trigger

    def begin(self) -> None:
        """Decoding starts: the cache as the prefill's cut and the question (fed, not yet cut) left it."""
        self.footprint.append(footprint_point(self.cache, 0))

    def finish(self) -> list[dict]:
        """The footprint, its end point added (unless the last cut already ended the generation)."""
        end = footprint_point(self.cache, self.generated)
        if self.footprint[-1] != end:
            self.footprint.append(end)
        return self.footprint

    def _trim(self) -> None:
        """Keep the last ``query_buffer`` queries per layer (kvpress's hidden_states_buffer_size)."""
        extra = len(self.positions) - self.plan.query_buffer
        if extra <= 0:
            return
        self.positions = self.positions[extra:]
        for layer_idx, parts in self.queries.items():
            joined = torch.cat(parts, dim=2)
            self.queries[layer_idx] = [joined[:, :, extra:]]

    def _window(self, layer_idx: int, current: int) -> tuple[Tensor, int]:
        """The buffered queries of a layer (rotated to ``current`` for ``query_positions: last``) and the position
        of the first."""
        queries = torch.cat(self.queries[layer_idx], dim=2)[:, :, -self.plan.query_buffer:]
        positions = self.positions[-queries.shape[2]:]
        if self.plan.query_positions == "last" and self.rotary is not None:
            delta = torch.tensor([current - p for p in positions], dtype=torch.float32)
            queries = rotate_by(queries, delta, self.rotary.inv_freq)
        return queries, positions[0]

    def _checked(self, scores: Tensor, n_heads: int, n_tokens: int) -> Tensor:
        if scores is None or tuple(scores.shape[1:]) != (n_heads, n_tokens):
            got = None if scores is None else tuple(scores.shape)
            raise ValueError(f"decoding: scorer {self.method.scorer.registered_name} returned scores {got} for a "
                             f"cache of {n_heads} KV head(s) x {n_tokens} entries")
        return scores.float()

    @torch.no_grad()
    def _compress(self, current: int) -> None:
        scorer, selector = self.method.scorer, self.method.selector
        n_layers = len(self.cache.layers)
        for layer_idx, (layer, lengths) in enumerate(zip(self.cache.layers, kept_per_head(self.cache))):
            if max(lengths) <= self.target or layer_idx not in self.queries:
                continue
            queries, first = self._window(layer_idx, current)
            module = self.modules[layer_idx]
            gen = torch.Generator(device="cpu").manual_seed(
                self.seed * 1_000_003 + layer_idx + 7919 * (self.compressions + 1))
            if not isinstance(layer, RaggedLayer):  # the layer's heads in one call, as the prefill scores them
                n_heads = layer.keys.shape[1]
                inputs = LayerInputs(layer_idx, n_layers, queries, layer.keys, layer.values, module, gen,
                                     rotary=self.rotary, query_start=first)
                scores = self._checked(scorer.decode_score(inputs), n_heads, layer.keys.shape[2])[0]
                budgets = torch.full((n_heads,), self.target, dtype=torch.long)
                chosen = selector.select(scorer.rerank(layer_idx, selector.protect(scores), budgets), budgets)
                scorer.decode_kept(layer_idx, [i.cpu() for i in chosen.unbind(0)])  # one budget: [H, target]
                self.cache.layers[layer_idx] = prune_layer(layer.keys, layer.values, chosen)
            else:  # each head with its own entries and its query group (``LayerInputs.kv_head``)
                group = queries.shape[1] // len(layer.head_keys)
                kept = []
                for h, (k, v) in enumerate(zip(layer.head_keys, layer.head_values)):
                    if k.shape[2] <= self.target:
                        kept.append(torch.arange(k.shape[2]))
                        continue
                    inputs = LayerInputs(layer_idx, n_layers, queries[:, h * group:(h + 1) * group], k, v, module,
                                         gen, rotary=self.rotary, query_start=first, kv_head=h)
                    scores = self._checked(scorer.decode_score(inputs), 1, k.shape[2])[0]
                    budget = torch.tensor([self.target])
                    kept.append(selector.select(scorer.rerank(layer_idx, selector.protect(scores), budget),
                                                budget)[0].cpu())
                scorer.decode_kept(layer_idx, kept)
                layer.keep(kept)  # in place: a layer with state of its own (SP-KV's gated layer) cuts it too
                if type(layer) is RaggedLayer and len(set(layer.lengths)) == 1:  # equal counts again: dense
                    self.cache.layers[layer_idx] = _dense_layer(torch.cat(layer.head_keys, dim=1),
                                                                torch.cat(layer.head_values, dim=1))


def footprint_fields(points: list[dict], generated: int, decode_s: float) -> dict:
    """A row's footprint fields (``kv_footprint``, whose ``generated`` counts the generated tokens fed back; the
    means over the generation; ``generated`` tokens and the decode time per generated token)."""
    return {"kv_footprint": points, "generated_tokens": int(generated),
            "kv_mean_entries": mean_footprint(points, "entries_mean"),
            "kv_mean_bytes": mean_footprint(points, "bytes"),
            "decode_ms_per_token": 1000.0 * decode_s / generated if generated else None}


__all__ = ["DecodeCompressor", "footprint_point", "mean_footprint", "footprint_fields"]
