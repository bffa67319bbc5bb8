"""The compression protocol: scorer -> allocator -> selector.

* A **scorer** gives every cached token an importance per KV head, ``[B, H_kv, T]`` (higher = keep). It is
  called once per layer during prefill with what the harness captured for that layer (``LayerInputs``), so
  scores never depend on the keep ratio and one prefill can serve many ratios.
* An **allocator** turns the scores of all layers and a keep ratio into integer budgets ``[L, H_kv]``.
* The **selector** keeps, per head, the top-``budget`` tokens, with ``n_sink`` first tokens and the most
  recent ``n_recent`` tokens always inside the budget.

A method (``methods/<name>.py``) registers a scorer and/or an allocator; a method's Hydra config names a
scorer, an allocator and the selector's protected tokens, so SnapKV+AdaKV is a config, not a class.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import torch
from torch import Tensor, nn


SCORERS: dict[str, type] = {}
ALLOCATORS: dict[str, type] = {}


def registrar(registry: dict[str, type]) -> Callable[[str], Callable[[type], type]]:
    """A class decorator factory: ``@register(name)`` puts the class in ``registry`` under ``name`` and sets its
    ``registered_name`` (scorers and allocators here, learners in harness.learning)."""
    def register(name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            registry[name] = cls
            cls.registered_name = name
            return cls

        return deco

    return register


register_scorer = registrar(SCORERS)


@dataclass(frozen=True)
class KeyChannels:
    """What a channel-pruning scorer keeps of one layer's keys (``Scorer.key_channels``): ``channels [H_kv, d]``,
    sorted channel indices per KV head, for every cached entry but the last ``n_full``, which keep all of theirs
    (ThinK's recent window; entries decoded later are stored whole too)."""

    channels: Tensor
    n_full: int = 0
register_allocator = registrar(ALLOCATORS)


DecodingMode = Literal["prefill", "decode", "both"]
QueryPositions = Literal["own", "last"]


@dataclass(frozen=True)
class DecodingPlan:
    """The ``decoding:`` settings of a run, resolved (``harness.schema.DecodingSettings``; the mechanism is
    ``harness.decoding``): when the cache is compressed (after the prefill, while decoding, or both), to how many
    entries per head, how often, and which queries the scorer sees."""

    mode: DecodingMode = "prefill"
    target_size: int | None = None
    compression_interval: int = 512
    query_buffer: int = 256
    query_positions: QueryPositions = "own"

    @property
    def compresses_decoding(self) -> bool:
        return self.mode != "prefill"

    @property
    def compresses_prefill(self) -> bool:
        return self.mode != "decode"

    def target(self, n_prompt: int, keep_ratio: float, rule: str) -> int:
        """Entries per head decoding cuts back to: ``target_size``, else the prefill's budget at the ratio."""
        return int(self.target_size) if self.target_size is not None else n_keep(n_prompt, keep_ratio, rule)

    def prefill_ratio(self, n_prompt: int, keep_ratio: float) -> float:
        """The keep ratio the prefill is compressed at: the run's, lowered to ``target_size`` entries in ``both``
        mode so that the cache never holds more than target + interval entries per head (the half-entry margin
        makes either budget rule count exactly ``target_size``)."""
        if self.mode == "both" and self.target_size is not None and n_prompt > self.target_size:
            return min(keep_ratio, (self.target_size + 0.5) / n_prompt)
        return keep_ratio

    def row_fields(self) -> dict:
        return {"decoding": self.mode,
                "decoding_target_size": self.target_size if self.compresses_decoding else None,
                "decoding_interval": self.compression_interval if self.compresses_decoding else None}


PREFILL_ONLY = DecodingPlan()


@dataclass
class LayerInputs:
    """What the attention hook captured for one layer at the end of prefill."""

    layer_idx: int
    n_layers: int
    queries: Tensor  # [B, H_q, T, D] after RoPE (and q_norm where the family has it): all prefill queries
    keys: Tensor  # [B, H_kv, T, D] after RoPE: the whole cache of this layer
    values: Tensor  # [B, H_kv, T, D]
    module: nn.Module  # the attention module (o_proj, scaling, head_dim, num_key_value_groups)
    generator: torch.Generator  # seeded per (seed, sample, layer): the only randomness a scorer may use
    hidden_states: Tensor | None = None  # [B, T, hidden] input of the attention block, if the scorer asked
    rotary: nn.Module | None = None  # the model's rotary embedding (for scorers that rotate future queries)
    # Prompt position of the first query: 0 for one prefill; a chunk's start in a chunked prefill, where the
    # cache before the queries holds only the kept entries (so key index != position).
    query_start: int = 0
    # The KV head ``keys`` belong to when a ragged layer is scored one head at a time (decode-time compression,
    # ``harness.decoding``; ``queries`` are then that head's group); None: ``keys`` hold every KV head.
    kv_head: int | None = None
    # ``[B, H_q, T]`` log-sum-exp of each prefill query's causal attention row, from the layer's own attention pass
    # (for a scorer that declares ``needs_row_lse``; None where the harness did not compute it)
    row_lse: Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    @property
    def scaling(self) -> float:
        return float(getattr(self.module, "scaling", self.keys.shape[-1] ** -0.5))


class Part:
    """What scorers and allocators share: a registered name, the budget rule, and the model-facing hooks.

    Every extension point a part may implement is declared here or on ``Scorer`` / ``Allocator`` with a default
    that does nothing, so the harness calls them unconditionally (it never probes a part with ``getattr``).
    """

    registered_name = ""
    budget_rule: str = "floor"  # set by ``Method``: how a ratio becomes a count (``BudgetRule``)

    def bind_model(self, model: nn.Module) -> None:
        """Called once before the run with the loaded model: refuse (one-line ``KvbenchError``) a learned
        checkpoint or profile made for another model, or prepare model-dependent state."""

    def input_files(self) -> dict[str, Path]:
        """The files this part read, by config key (``{"method.allocator.profile": path}``): the runner
        fingerprints them, so a run dir cannot mix rows made with two different files."""
        return {}


class Scorer(Part):
    """Importance of every cached token per KV head. Subclasses set what they need from the harness."""

    needs_hidden_states = False  # True: ``LayerInputs.hidden_states`` is captured for this scorer
    # True: a causal CPU prefill computes its attention with the fused kernel that also returns each query row's
    # log-sum-exp (the same output, bit for bit) and hands it to ``score`` as ``LayerInputs.row_lse`` (H2O's sums)
    needs_row_lse = False
    # False where the scores depend on the keep ratio or the prefill itself changes (then one prefill per ratio).
    shares_across_ratios = True
    # False for a scorer that cannot score a chunk's queries against an already compressed cache
    # (``method.prefill_chunk``): one that scores from its own forwards after the prefill (``after_prefill``:
    # KVzip) or prunes channels of the whole prefill (``key_channels``: ThinK).
    supports_chunked_prefill = True
    # True for a scorer whose ``prefill_inputs`` caches its tokens at positions of its own, 0 .. n - 1 (GemFilter's
    # second prefill of the tokens it selected): there is nothing for ``method.rerotate_keys`` to re-rotate.
    renumbers_positions = False
    # False for a scorer whose prefill cuts some layers itself and leaves them unscored (the layer-wise prefill
    # methods: ASL, FastKV, PyramidInfer, GemFilter): an allocator that measures every layer
    # (``Allocator.needs_every_layer``: CAKE, HeadKV) cannot budget them, so the pair is refused.
    scores_every_layer = True
    # Parameter presets, ``{"kvpress": {"scorer": {...}, "selector": {...}, "budget_rule": "kvpress"}}``: values
    # of this method's parts and method-level keys that ``method.preset=<name>`` sets over the config's.
    PRESETS: dict[str, dict[str, Any]] = {}

    def varies_layer_counts(self, keep_ratio: float) -> bool:
        """Whether the prefill leaves layers with different numbers of cached entries at ``keep_ratio`` by design
        (PyramidInfer's pyramid; FastKV propagating fewer tokens than the budget): ``method.rerotate_keys`` needs
        one count everywhere, so the run refuses the pair before anything is written."""
        return False

    def score(self, inputs: LayerInputs) -> Tensor | None:  # pragma: no cover - interface
        """``[B, H_kv, T]`` scores, or None when the layer needs no selection (kept whole)."""
        raise NotImplementedError

    # False for a scorer that cannot score a cache during decoding (``decoding.mode=decode|both``): one whose
    # scores come from the prefill's own machinery (forwards after it, a cut prefill, the question's attention,
    # per-token hidden states of the whole prompt, pruned key channels).
    supports_decoding = True
    # True for a scorer that reads hidden states in its prefill but keeps its own score of every entry written while
    # decoding (SP-KV's gates, computed at write time by its ``decode_patch``): decoding may compress with it.
    scores_decoding_itself = False
    # False for a scorer whose ``decode_patch`` changes how its cache is written or attended (SP-KV's gated
    # layers): its samples are decoded one at a time, whatever ``batch_size`` says.
    batches_decoding = True

    def decode_score(self, inputs: LayerInputs) -> Tensor:
        """``[B, H_kv, T]`` scores of a layer's cache during decoding (``harness.decoding``): ``inputs.keys`` /
        ``values`` are the whole cache (one KV head at a time when the layer is ragged), ``inputs.queries`` the
        queries of the steps since the last compression, ``inputs.query_start`` the position of the first.
        Default: ``score`` on them (SnapKV's window, TOVA's last query, Knorm's keys). An online scorer (H2O's
        accumulated attention) returns what it kept up to date in ``decode_step``."""
        return self.score(inputs)

    def begin_decoding(self, kept: "list[Tensor | list[Tensor] | None] | None") -> None:
        """Called before a generation whose cache decoding compresses, with the prefill's kept indices per layer
        (``Method.plan``'s: None for a layer kept whole) or None when the prefill was chunked (the cache is what
        its last chunk scored): for a scorer that carries its prefill scores into decoding (online H2O)."""

    def decode_step(self, layer_idx: int, query: Tensor, key, scaling: float) -> None:
        """Called in every layer's attention at each decoding step while decoding compresses, with the step's
        queries ``[B, H_q, q, D]``, the layer's whole cache keys (the new entries included; a ``Tensor``
        ``[B, H_kv, T, D]`` or ``harness.cache.RaggedKV``) and the attention's scaling, for a scorer that
        accumulates over the generation."""

    def decode_kept(self, layer_idx: int, kept: list[Tensor]) -> None:
        """Called after each decode-time cut of a layer with the cache indices each KV head kept (sorted), for a
        scorer whose state is aligned with the cache entries (it cuts its state alike)."""

    def begin_prefill(self, ids: list[int], n_question: int) -> None:
        """Called before each prefill with its prompt's token ids, of which the last ``n_question`` are the question
        (0 where the question comes after compression: query-agnostic runs, ``kvbench.compress``). For prompt-guided
        scorers (Finch observes the question's attention)."""

    def prefill_inputs(self, model: nn.Module, ids: list[int], keep_ratio: float
                       ) -> tuple[list[int], list[int]] | None:
        """Called by ``harness.pipeline.prefill`` inside the scoring hooks and ``prefill_patch``, right before the
        prefill's forward, with the prompt's ids. A method that prefills other tokens than the prompt returns the
        token ids and the positions to prefill instead (GemFilter: a partial forward of its own up to its filter
        layer, run here under the same hooks, selects the tokens, which are then prefilled alone at 0 .. k - 1);
        the prefill's cache and logits are theirs, decoding continues after the last of those positions, and
        ``prefill_kept`` names the prompt indices they came from. None (the default): the prompt at 0 .. T - 1."""
        return None

    def after_prefill(self, model: nn.Module, cache, ids: list[int]) -> list[Tensor | None] | None:
        """Called by ``harness.pipeline.prefill`` (and ``kvbench.compress``) once the prefill's forward has returned,
        outside the scoring hooks and before ``finish_prefill``, with the model, the prefilled cache (a
        ``DynamicCache`` holding every layer's keys and values of ``ids``) and the prompt ids. A scorer that scores
        from forwards of its own on that cache (KVzip's context reconstruction) returns the per-layer scores
        ``[B, H_kv, T]`` that replace the hooks' ones; None (the default) keeps them. It must leave the cache as it
        found it (a forward that appends entries truncates them again)."""
        return None

    def bind_selector(self, selector: "Selector") -> None:
        """Called once when the method is built, for a scorer whose statistics depend on the tokens the selector
        protects (ExpectedAttention leaves the sinks out of its query statistics)."""

    def query_rows(self, layer_idx: int) -> Tensor | None:
        """Prompt positions whose attention output this prefill layer must still compute (sorted), or None for
        all. Asked right after ``score`` on the same layer: a method that drops the other tokens' hidden states
        from this layer on (ASL at its selection layer) saves their attention, whose outputs nothing reads."""
        return None

    def finish_prefill(self, scores: list[Tensor | None]) -> list[Tensor | None]:
        """The per-layer scores of the prefill that just ended, as the allocator should see them. A scorer that
        decides late that earlier layers stay whole (ASL with ``early_layers=full``) returns None for them."""
        return scores

    def prefill_kept(self) -> list[Tensor | None] | None:
        """Per layer, the original token indices the last prefill already cut the cache to (a scorer whose
        ``prefill_patch`` shortens the prefill, ASL), or None when the prefill kept every token everywhere."""
        return None

    def row_extras(self) -> dict[str, Any]:
        """Method-specific facts about the last prefill, merged into each row (e.g. ASL's selection layer)."""
        return {}

    def prefill_patch(self, model: nn.Module, keep_ratio: float):
        """Context manager entered around the prefill, for methods that change the prefill itself (e.g. ASL
        shortens hidden states from some layer on). Such a scorer sets ``shares_across_ratios = False``."""
        return nullcontext()

    def decode_patch(self, model: nn.Module, cache):
        """Context manager entered around decoding on the pruned cache (e.g. SP-KV gates new entries)."""
        return nullcontext()

    def merge(self, layer_idx: int, keys: Tensor, values: Tensor, kept: Tensor | list[Tensor]
              ) -> tuple[Tensor, Tensor]:
        """After selection, before the cache is cut to ``kept`` (a layer's ``Method.plan`` indices, ``[H, b]`` or
        one tensor per head): the layer's whole prefill ``keys`` / ``values`` ``[B, H_kv, T, D]``, returned with
        the kept positions rewritten from the evicted ones (CaM folds evicted values into kept neighbours). Only
        the kept positions of what it returns are read; the inputs are the shared prefill cache, which other keep
        ratios prune too, so a merging scorer writes into copies. Default: both unchanged."""
        return keys, values

    def key_channels(self, keep_ratio: float) -> "list[KeyChannels | None] | None":
        """Per layer, the key channels the pruned cache keeps of the last prefill's keys at this ratio (ThinK
        prunes dimensions, not tokens: ``harness.cache.prune`` then stores only those channels, and decoding
        scores the old keys on the same channels of its queries), or None for every channel. Default: None."""
        return None

    def rerank(self, layer_idx: int, scores: Tensor, budgets: Tensor) -> Tensor:
        """Budget-dependent selection: once the allocator has set a layer's budgets ``[H]``, the scores ``[H, T]``
        the selector takes each head's top-``budget`` of (CriticalKV's two stages: the first share of a head's
        budget by the scores, the rest by a second score; ChunkKV: whole chunks). ``scores`` are the layer's as
        the allocator saw them, sinks and recent tokens at +inf; the selector keeps those whatever is returned
        (where a budget is smaller than them, those of them with the best returned scores: ``select``).
        Called by ``Method.plan`` for every ratio of a shared prefill, so it must not change what ``score`` stored:
        a scorer that needs per-layer auxiliaries here (CriticalKV's ||W_o v||_1) keeps them from its ``score``
        of the same layer in the last prefill. Default: the scores unchanged."""
        return scores


class WrappedScorer(Scorer):
    """A scorer that modifies another scorer, ``self.base`` (CriticalKV, ChunkKV): configured as
    ``scorer: {name: <wrapper>, base: <scorer node>, ...}``, the base built and checked like any scorer part
    (``method.scorer.base=tova``, ``method.scorer.base.window=16``). Every extension point is forwarded to the
    base by default, so any scorer can be wrapped; a wrapper overrides what it changes (``score``, ``rerank``)."""

    # The __init__ parameters that are scorer nodes (built into scorers by ``methods.build_method``).
    SCORER_PARAMS: tuple[str, ...] = ("base",)
    # Allocators that belong to the wrapper's mechanism (ChunkKV's ``chunk``): the rows' label does not add them.
    OWN_ALLOCATORS: tuple[str, ...] = ()

    def __init__(self, base: Scorer):
        self.base = base

    @property
    def needs_hidden_states(self) -> bool:  # type: ignore[override]
        return self.base.needs_hidden_states

    @property
    def needs_row_lse(self) -> bool:  # type: ignore[override]
        return self.base.needs_row_lse

    @property
    def shares_across_ratios(self) -> bool:  # type: ignore[override]
        return self.base.shares_across_ratios

    @property
    def supports_chunked_prefill(self) -> bool:  # type: ignore[override]
        return self.base.supports_chunked_prefill

    @property
    def renumbers_positions(self) -> bool:  # type: ignore[override]
        return self.base.renumbers_positions

    @property
    def scores_every_layer(self) -> bool:  # type: ignore[override]
        return self.base.scores_every_layer

    def varies_layer_counts(self, keep_ratio: float) -> bool:
        return self.base.varies_layer_counts(keep_ratio)

    @property
    def budget_rule(self) -> str:  # type: ignore[override]
        return self.base.budget_rule

    @budget_rule.setter
    def budget_rule(self, rule: str) -> None:  # Method sets it on its parts: the base counts with it too
        self.base.budget_rule = rule

    def bind_model(self, model: nn.Module) -> None:
        self.base.bind_model(model)

    def input_files(self) -> dict[str, Path]:
        # the base's keys are one level down: method.scorer.checkpoint -> method.scorer.base.checkpoint
        return {key.replace("method.scorer.", "method.scorer.base.", 1): path
                for key, path in self.base.input_files().items()}

    def score(self, inputs: LayerInputs) -> Tensor | None:
        return self.base.score(inputs)

    @property
    def supports_decoding(self) -> bool:  # type: ignore[override]
        return self.base.supports_decoding

    @property
    def scores_decoding_itself(self) -> bool:  # type: ignore[override]
        return self.base.scores_decoding_itself

    @property
    def batches_decoding(self) -> bool:  # type: ignore[override]
        return self.base.batches_decoding

    def decode_score(self, inputs: LayerInputs) -> Tensor:
        return self.base.decode_score(inputs)

    def begin_decoding(self, kept: "list[Tensor | list[Tensor] | None] | None") -> None:
        self.base.begin_decoding(kept)

    def decode_step(self, layer_idx: int, query: Tensor, key, scaling: float) -> None:
        self.base.decode_step(layer_idx, query, key, scaling)

    def decode_kept(self, layer_idx: int, kept: list[Tensor]) -> None:
        self.base.decode_kept(layer_idx, kept)

    def begin_prefill(self, ids: list[int], n_question: int) -> None:
        self.base.begin_prefill(ids, n_question)

    def prefill_inputs(self, model: nn.Module, ids: list[int], keep_ratio: float
                       ) -> tuple[list[int], list[int]] | None:
        return self.base.prefill_inputs(model, ids, keep_ratio)

    def after_prefill(self, model: nn.Module, cache, ids: list[int]) -> list[Tensor | None] | None:
        return self.base.after_prefill(model, cache, ids)

    def bind_selector(self, selector: "Selector") -> None:
        self.base.bind_selector(selector)

    def query_rows(self, layer_idx: int) -> Tensor | None:
        return self.base.query_rows(layer_idx)

    def finish_prefill(self, scores: list[Tensor | None]) -> list[Tensor | None]:
        return self.base.finish_prefill(scores)

    def prefill_kept(self) -> list[Tensor | None] | None:
        return self.base.prefill_kept()

    def row_extras(self) -> dict[str, Any]:
        return self.base.row_extras()

    def prefill_patch(self, model: nn.Module, keep_ratio: float):
        return self.base.prefill_patch(model, keep_ratio)

    def decode_patch(self, model: nn.Module, cache):
        return self.base.decode_patch(model, cache)

    def merge(self, layer_idx: int, keys: Tensor, values: Tensor, kept: Tensor | list[Tensor]
              ) -> tuple[Tensor, Tensor]:
        return self.base.merge(layer_idx, keys, values, kept)

    def key_channels(self, keep_ratio: float) -> "list[KeyChannels | None] | None":
        return self.base.key_channels(keep_ratio)

    def rerank(self, layer_idx: int, scores: Tensor, budgets: Tensor) -> Tensor:
        return self.base.rerank(layer_idx, scores, budgets)

    @property
    def label(self) -> str:
        """``wrapper(base)``, e.g. ``criticalkv(snapkv)``: the rows' name when the config sets no label."""
        base = self.base.label if isinstance(self.base, WrappedScorer) else self.base.registered_name
        return f"{self.registered_name}({base})"


class Allocator(Part):
    """Budgets per (layer, KV head) for a keep ratio, from the scores of every layer. Counts come from
    ``self.n_keep`` (the method's budget rule, which ``Method`` sets on its allocator)."""

    # What the budgets may vary over. Options that need equal counts refuse an allocator that declares more:
    # chunked prefill needs every head of a layer alike (a dense cache to run the next chunk on), key
    # re-rotation needs one count everywhere (one position to decode from).
    per_head_budgets = False
    per_layer_budgets = False
    # True for an allocator that needs a score in every layer (it budgets each layer from what it measured there:
    # CAKE's preferences, HeadKV's head scores); refused with a scorer that leaves layers unscored.
    needs_every_layer = False

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def bind_scorer(self, scorer: "Scorer | None") -> None:
        """Called once when the method is built, for an allocator whose budgets read what its scorer measured
        during the prefill besides the per-token scores (SimLayerKV's layer laziness); such an allocator refuses
        (``KvbenchError``) a scorer that does not measure it."""

    def observe(self, inputs: LayerInputs) -> None:
        """Called for every layer during the prefill, right after the scorer's ``score``, with the same captured
        inputs: for an allocator whose budgets read the prefill's attention itself, whatever the scorer (CAKE's
        layer preferences from the observation window). It must not change ``inputs``. Default: nothing."""

    def n_keep(self, n_tokens: int, keep_ratio: float) -> int:
        return n_keep(n_tokens, keep_ratio, self.budget_rule)


# How a ratio becomes a count of entries (``Method.budget_rule``; every allocator asks ``n_keep`` with it):
#   floor   -- ``floor(T * keep_ratio + 1e-6)``: the count the ratio means in exact arithmetic (the epsilon
#              absorbs float noise such as 100 * 0.29 = 28.999999999999996). kvbench's default.
#   kvpress -- kvpress 0.5.5's ``int(T * (1 - compression_ratio))`` with no epsilon, ``compression_ratio =
#              1 - keep_ratio`` in float: 1 - 0.9 = 0.09999999999999998, so T = 1000 at cr 0.9 keeps 99, not
#              100 (every T divisible by 10 at cr 0.9, by 5 at cr 0.8, T = 90, 330, ... at cr 0.3). Set by
#              ``method.preset=kvpress``.
BudgetRule = Literal["floor", "kvpress"]
BUDGET_RULES: tuple[str, ...] = get_args(BudgetRule)
# What a method's ``kvpress`` preset adds so that its counts are kvpress's (see ``kept_fraction``).
KVPRESS_BUDGET: dict[str, Any] = {"budget_rule": "kvpress"}
# The presets of a scorer whose defaults already are kvpress's (streaming_llm, tova, knorm, expected_attention):
# ``method.preset=kvpress`` then only switches the counts to kvpress's.
KVPRESS_COUNTS_ONLY: dict[str, dict[str, Any]] = {"kvpress": KVPRESS_BUDGET}


def kept_fraction(keep_ratio: float, rule: BudgetRule = "floor") -> float:
    """The fraction a rule multiplies the token count by: ``keep_ratio`` itself (floor), or kvpress's
    ``1 - compression_ratio`` with ``compression_ratio = 1 - keep_ratio`` computed in float (kvpress).

    A keep ratio made from a typed compression ratio (``keep = 1 - cr``, as ``compression_ratio=`` does) comes
    back unchanged, ``1 - (1 - keep) == keep`` (exact in binary floating point for such a ``keep``), so the
    count is kvpress's ``int(T * (1 - cr))`` with the very ``cr`` typed; a typed keep ratio 0.1 gives
    kvpress's cr 0.9, i.e. 0.09999999999999998.
    """
    if rule == "kvpress":
        return 1.0 - (1.0 - float(keep_ratio))
    if rule == "floor":
        return float(keep_ratio)
    raise ValueError(f"budget rule {rule!r} is not one of {', '.join(BUDGET_RULES)}")


def n_keep(n_tokens: int, keep_ratio: float, rule: BudgetRule = "floor") -> int:
    """Entries kept per head of ``n_tokens`` for a keep ratio under a budget rule (see ``BudgetRule``):
    floor ``max(1, floor(T * keep + 1e-6))``, kvpress ``max(1, int(T * (1 - cr)))``; at most ``T``."""
    fraction = kept_fraction(keep_ratio, rule)
    exact = n_tokens * fraction if rule == "kvpress" else math.floor(n_tokens * fraction + 1e-6)
    return max(1, min(n_tokens, int(exact)))


def round_to_total(ideal: Tensor, total: int, lo: Tensor | int, hi: Tensor | int) -> Tensor:
    """Integers within ``[lo, hi]`` summing to ``total`` (clipped to what the bounds allow), close to ``ideal``:
    floor, then +1 to the largest fractional parts (or -1 to the smallest) until the sum is exact; ties go to
    the lower index. The one rounding of budgets that must sum exactly (LU-KV's profile shares, LKV's learned
    shares)."""
    ideal = ideal.double().flatten()
    lo_t = torch.as_tensor(lo, dtype=torch.long).flatten().expand_as(ideal).clone()
    hi_t = torch.as_tensor(hi, dtype=torch.long).flatten().expand_as(ideal).clone()
    total = int(min(max(total, int(lo_t.sum())), int(hi_t.sum())))
    out = torch.minimum(torch.maximum(ideal.floor().long(), lo_t), hi_t)
    frac = ideal - ideal.floor()
    while int(out.sum()) != total:
        diff = total - int(out.sum())
        if diff > 0:
            room = out < hi_t
            key = torch.where(room, frac + (ideal - out.double()).clamp(min=0), torch.full_like(frac, -1e18))
            order = key.argsort(descending=True, stable=True)[: min(diff, int(room.sum()))]
            out[order] += 1
        else:
            room = out > lo_t
            key = torch.where(room, frac - (out.double() - ideal).clamp(min=0), torch.full_like(frac, 1e18))
            order = key.argsort(stable=True)[: min(-diff, int(room.sum()))]
            out[order] -= 1
    return out


@register_allocator("uniform")
class UniformAllocator(Allocator):
    """Every layer and head keeps the same number of entries."""

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:
        n_heads, n_tokens = scores[0].shape[-2], scores[0].shape[-1]
        return torch.full((len(scores), n_heads), self.n_keep(n_tokens, keep_ratio), dtype=torch.long)


def protect(scores: Tensor, n_sink: int, n_recent: int) -> Tensor:
    """Scores with the sink and recent tokens set to +inf, so top-k always keeps them."""
    scores = scores.clone()
    n_tokens = scores.shape[-1]
    if n_sink > 0:
        scores[..., : min(n_sink, n_tokens)] = math.inf
    if n_recent > 0:
        scores[..., max(0, n_tokens - n_recent) :] = math.inf
    return scores


def select(scores: Tensor, budgets: Tensor, n_sink: int = 0, n_recent: int = 0) -> Tensor | list[Tensor]:
    """Kept token indices of one layer, sorted ascending.

    ``scores`` is ``[H, T]`` (batch 1), ``budgets`` ``[H]``. Returns an ``[H, b]`` tensor when every head keeps
    the same number ``b``, else a list of ``H`` 1-D tensors (a ragged layer). A head whose budget is smaller than
    the protected tokens keeps the protected tokens with the best ``scores`` (ChunkKV's whole best chunks of the
    window; scores that are +inf there already leave the choice to top-k's tie-breaking).
    """
    n_tokens = scores.shape[-1]
    budgets = budgets.clamp(1, n_tokens)
    protected = protect(scores, n_sink, n_recent)
    forced = protect(torch.zeros_like(scores[:1]), n_sink, n_recent).isinf()  # [1, T]
    short = budgets.to(scores.device) < int(forced.sum())
    if bool(short.any()):
        inside = scores.masked_fill(~forced, -math.inf)  # only protected tokens compete
        protected = torch.where(short[:, None], inside, protected)
    scores = protected
    if bool((budgets == budgets[0]).all()):
        return scores.topk(int(budgets[0]), dim=-1).indices.sort(dim=-1).values
    return [s.topk(int(b)).indices.sort().values for s, b in zip(scores, budgets)]


@dataclass(frozen=True)
class Selector:
    """Per head, the top-``budget`` entries, with the first ``n_sink`` and the most recent ``n_recent`` tokens
    always inside the budget; ``recent_share`` reserves at least that fraction of the smallest head budget of a
    layer for recent tokens (H2O's half of the budget)."""

    n_sink: int = 0
    n_recent: int = 0
    recent_share: float = 0.0

    def protect(self, scores: Tensor) -> Tensor:
        return protect(scores, self.n_sink, self.n_recent)

    def select(self, scores: Tensor, budgets: Tensor) -> Tensor | list[Tensor]:
        n_recent = self.n_recent
        if self.recent_share > 0:
            n_recent = max(n_recent, int(self.recent_share * int(budgets.min())))
        return select(scores, budgets, self.n_sink, n_recent)

    @property
    def protected(self) -> int:
        """Tokens every head keeps whatever its scores (a budget must exceed this to select anything)."""
        return self.n_sink + self.n_recent


@dataclass
class Method:
    """A configured eviction method: scorer + allocator + selector."""

    name: str  # label in rows and reports, e.g. "snapkv" or "snapkv+adakv"
    scorer: Scorer | None  # None = full cache, nothing evicted
    allocator: Allocator
    selector: Selector = field(default_factory=Selector)
    # How a ratio becomes a count (``BudgetRule``): "floor" (default) or "kvpress" (``method.preset=kvpress``).
    budget_rule: BudgetRule = "floor"
    # The method config as validated (booleans as true/false, ...): what the run dir's config.yaml records.
    config: dict = field(default_factory=dict)
    # The keep ratio the library's ``kvbench.compress`` / ``kvbench.generate`` use (``kvbench.method(...,
    # keep_ratio=)``); None for a method built for a run, whose ratios come from the run config.
    keep_ratio: float | None = None
    # Chunked prefill (``method.prefill_chunk``): the prompt is prefilled this many tokens at a time and the cache
    # compressed back to the budget after each chunk, so it never holds more than budget + chunk entries
    # (``harness.pipeline.chunked_prefill``). None: one prefill, compressed once.
    prefill_chunk: int | None = None
    # ``method.rerotate_keys``: after eviction, the kept keys are rotated to positions 0 .. n - 1 and decoding
    # continues from n (kvpress's KeyRerotationPress; ``harness.cache.rerotate``).
    rerotate_keys: bool = False
    # When the cache is compressed: after the prefill (the default), while decoding, or both (``decoding:``).
    decoding: DecodingPlan = PREFILL_ONLY

    def __post_init__(self) -> None:
        if self.budget_rule not in BUDGET_RULES:
            raise ValueError(f"budget_rule {self.budget_rule!r} is not one of {', '.join(BUDGET_RULES)}")
        self._check_decoding()
        if self.scorer is not None and self.prefill_chunk is not None:
            if self.allocator.per_head_budgets:
                raise ValueError(f"method.prefill_chunk={self.prefill_chunk} needs the heads of a layer to keep "
                                 f"as many entries each; allocator {self.allocator.registered_name} budgets per "
                                 "head (use the uniform allocator)")
            if self.allocator.per_layer_budgets:
                raise ValueError(f"method.prefill_chunk={self.prefill_chunk} compresses every layer to one budget; "
                                 f"allocator {self.allocator.registered_name} budgets per layer (use uniform)")
            if not self.scorer.supports_chunked_prefill:
                raise ValueError(f"method.prefill_chunk={self.prefill_chunk}: scorer {self.scorer.registered_name} "
                                 "scores the whole prefill at once; it cannot be prefilled in chunks")
            if not self.scorer.shares_across_ratios:
                raise ValueError(f"method.prefill_chunk={self.prefill_chunk}: scorer "
                                 f"{self.scorer.registered_name} changes the prefill itself; it cannot also be "
                                 "prefilled in chunks")
        if self.scorer is not None and self.rerotate_keys and (self.allocator.per_head_budgets
                                                               or self.allocator.per_layer_budgets):
            raise ValueError(f"method.rerotate_keys=true needs one kept count in every layer and head; allocator "
                             f"{self.allocator.registered_name} varies it (use the uniform allocator)")
        if self.scorer is not None and self.allocator.needs_every_layer and not self.scorer.scores_every_layer:
            raise ValueError(f"allocator {self.allocator.registered_name} budgets every layer from its own measures; "
                             f"scorer {self.scorer.registered_name} cuts layers during the prefill and leaves them "
                             "unscored (use the method's own allocator)")
        if self.scorer is not None and self.rerotate_keys and self.scorer.renumbers_positions:
            raise ValueError(f"method.rerotate_keys=true: scorer {self.scorer.registered_name} already caches its "
                             "tokens at positions 0 .. n - 1 and decodes from n (nothing to re-rotate); drop the option")
        for part in self.parts:  # one rule for every count the method makes
            part.budget_rule = self.budget_rule
        if self.scorer is not None:
            self.scorer.bind_selector(self.selector)
            self.allocator.bind_scorer(self.scorer)

    def _check_decoding(self) -> None:
        plan = self.decoding
        if not plan.compresses_decoding:
            return
        mode = f"decoding.mode={plan.mode}"
        if self.scorer is None:
            raise ValueError(f"{mode} compresses the cache while decoding; method {self.name} keeps everything "
                             "(pick a compressing method, or decoding.mode=prefill)")
        if not self.scorer.supports_decoding:
            raise ValueError(f"{mode}: scorer {self.scorer.registered_name} scores only a prefill (its scores come "
                             "from the prefill's own machinery); use decoding.mode=prefill")
        if self.scorer.needs_hidden_states and not self.scorer.scores_decoding_itself:
            raise ValueError(f"{mode}: scorer {self.scorer.registered_name} scores each token from its hidden state, "
                             "which the cache does not keep past the prefill; use decoding.mode=prefill")
        if self.scorer.scores_decoding_itself and (plan.mode == "decode" or
                                                   self.allocator.registered_name != self.scorer.registered_name):
            raise ValueError(f"{mode}: scorer {self.scorer.registered_name} ranks the layers its own allocator cuts at "
                             f"the prefill; use decoding.mode=both with method.allocator={self.scorer.registered_name}")
        if plan.mode == "decode" and self.prefill_chunk is not None:
            raise ValueError(f"{mode} keeps the prefill whole; method.prefill_chunk={self.prefill_chunk} compresses "
                             "it (use decoding.mode=both, or drop method.prefill_chunk)")
        if plan.target_size is not None and plan.target_size <= self.selector.protected:
            raise ValueError(f"decoding.target_size={plan.target_size} must be above the {self.selector.protected} "
                             "entries the selector always keeps (method.selector.n_sink + n_recent)")

    @property
    def parts(self) -> list[Part]:
        return [p for p in (self.scorer, self.allocator) if p is not None]

    @property
    def compresses(self) -> bool:
        return self.scorer is not None

    @property
    def shares_across_ratios(self) -> bool:
        # a chunked prefill is compressed to the budget while it runs: one prefill per ratio
        return self.scorer is None or (self.scorer.shares_across_ratios and self.prefill_chunk is None)

    def bind_model(self, model: nn.Module) -> None:
        for part in self.parts:
            part.bind_model(model)

    def input_files(self) -> dict[str, Path]:
        return {key: path for part in self.parts for key, path in part.input_files().items()}

    def merge(self, layer_idx: int, keys: Tensor, values: Tensor, kept: Tensor | list[Tensor]
              ) -> tuple[Tensor, Tensor]:
        """The scorer's ``merge`` of one layer before pruning (``harness.cache.prune``'s ``merge``)."""
        if self.scorer is None:
            return keys, values
        return self.scorer.merge(layer_idx, keys, values, kept)

    def key_channels(self, keep_ratio: float) -> "list[KeyChannels | None] | None":
        """The scorer's ``key_channels`` at this ratio (``harness.cache.prune``'s ``channels``)."""
        return None if self.scorer is None else self.scorer.key_channels(keep_ratio)

    def plan(self, scores: list[Tensor | None], keep_ratio: float) -> tuple[Tensor, list[Tensor | list[Tensor] | None]]:
        """Budgets ``[L, H]`` and kept indices per layer (``None`` for a layer kept whole).

        A layer whose score is ``None`` is kept whole (its scorer already decided, e.g. during prefill); the
        allocator sees every scored layer, and layers may hold different numbers of tokens.
        """
        squeezed = [None if s is None else (s[0] if s.dim() == 3 else s) for s in scores]
        scored = [i for i, s in enumerate(squeezed) if s is not None]
        n_heads = squeezed[scored[0]].shape[0] if scored else 0
        budgets = torch.zeros(len(squeezed), n_heads, dtype=torch.long)
        if scored:
            # The allocator sees sinks and recent tokens at +inf, as kvpress's padding does before AdaKV's cut.
            protected = [self.selector.protect(squeezed[i]) for i in scored]
            sub = self.allocator.budgets(protected, keep_ratio)
            if sub.shape != (len(scored), n_heads):
                raise RuntimeError(f"allocator {self.allocator.registered_name} returned budgets {tuple(sub.shape)}")
            budgets[scored] = sub
        kept: list[Tensor | list[Tensor] | None] = []
        for layer_idx, (layer_scores, layer_budgets) in enumerate(zip(squeezed, budgets)):
            if layer_scores is None or bool((layer_budgets >= layer_scores.shape[-1]).all()):
                kept.append(None)
                continue
            # budget-dependent selection (CriticalKV's stages, ChunkKV's chunks); the default returns the scores
            ranked = self.scorer.rerank(layer_idx, self.selector.protect(layer_scores), layer_budgets)
            kept.append(self.selector.select(ranked, layer_budgets))
        return budgets, kept


def evidence_retention(kept: list[Tensor | list[Tensor] | None], evidence: list[int]) -> tuple[float, list[float]]:
    """Fraction of evidence tokens kept: overall (mean over layers) and per layer (mean over KV heads).

    A layer kept whole retains everything. Used for the diagnostic of "When does value-aware eviction help?"
    (a probe among the papers citing ASL, arXiv:2601.07667): did the method keep the tokens the answer needs?
    """
    if not evidence:
        return 1.0, [1.0] * len(kept)
    wanted = torch.tensor(sorted(set(evidence)))
    per_layer = []
    for idx in kept:
        if idx is None:
            per_layer.append(1.0)
            continue
        heads = list(idx) if isinstance(idx, list) else list(idx.unbind(0))
        per_layer.append(sum(float(torch.isin(wanted, h.cpu()).float().mean()) for h in heads) / len(heads))
    return sum(per_layer) / len(per_layer), per_layer
