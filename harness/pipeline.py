"""One sample: prefill -> compress -> decode, for one or several keep ratios.

The scores a method computes during prefill do not depend on the keep ratio, so a sample is prefilled and
scored once and each ratio only selects, prunes a copy of the cache and decodes (kvpress re-runs the
prefill per ratio). Methods whose prefill depends on the ratio get one prefill per ratio.
"""
from __future__ import annotations

import copy
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from transformers import DynamicCache

from harness.attention import Hooks
from harness.cache import cache_bytes, kept_per_head, prune, rerotate
from harness.compat import cache_of, with_cache
from harness.compress import Method, n_keep
from harness.decoding import DecodeCompressor, footprint_fields


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    """Resident set size of this process (Linux), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryMeter:
    """Peak memory of a phase: CUDA peak allocated on GPU; on CPU the largest RSS seen at phase boundaries."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = rss_bytes()
        self.peak = self.base

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak = max(self.peak, rss_bytes())

    def delta(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        self.sample()
        return int(self.peak - self.base)


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    decode_s: float
    # the cache's footprint over the generation and its speed (``harness.decoding.footprint_fields``)
    footprint: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prefill:
    cache: DynamicCache
    scores: list[Tensor]
    last_logits: Tensor
    n_tokens: int
    prefill_s: float
    score_s: float
    extras: dict[str, Any] = field(default_factory=dict)
    # Per layer, the original token indices a prefill-changing method (ASL) already cut the cache to.
    prefill_kept: list[Any] | None = None
    # Where decoding continues: after the last prefilled position (the prompt's length unless the scorer's
    # ``prefill_inputs`` prefilled other positions: GemFilter's k selected tokens at 0 .. k - 1). None: n_tokens.
    next_position: int | None = None


@dataclass
class Outcome:
    keep_ratio: float
    prediction: str
    context_tokens: int
    kept_tokens: float
    kv_bytes: int
    kv_bytes_full: int
    prefill_s: float
    compress_s: float
    decode_s: float
    peak_mem_bytes: int
    budgets: list[list[int]] = field(default_factory=list)
    kept: list[Any] | None = None  # kept indices per layer (for diagnostics such as evidence retention)
    extras: dict[str, Any] = field(default_factory=dict)  # the scorer's row_extras()
    footprint: dict[str, Any] = field(default_factory=dict)  # kv_footprint and its means (Generation.footprint)


@torch.no_grad()
def prefill(model, hooks: Hooks, ids: list[int], method: Method, seed: int, keep_ratio: float = 1.0,
            n_question: int = 0) -> Prefill:
    """Prefill ``ids`` under the method's scoring hooks; the last ``n_question`` ids are the question (query-aware)."""
    device = model.device
    if method.scorer is not None:
        method.scorer.begin_prefill(list(ids), n_question)
    input_ids = torch.tensor([ids], device=device)
    positions = torch.arange(len(ids), device=device)[None]
    _sync(device)
    start = time.perf_counter()
    patch = method.scorer.prefill_patch(model, keep_ratio) if method.scorer is not None else nullcontext()
    with hooks.scoring(method.scorer, seed, method.allocator), patch:
        # a method may prefill other tokens than the prompt (GemFilter: those its own partial pass selected)
        given = method.scorer.prefill_inputs(model, list(ids), keep_ratio) if method.scorer is not None else None
        if given is not None:
            input_ids, positions = (torch.tensor([list(x)], device=device) for x in given)
        out = model(input_ids=input_ids, position_ids=positions, **with_cache(DynamicCache()), use_cache=True,
                    logits_to_keep=1)
        _sync(device)
        elapsed = time.perf_counter() - start
        score_s = hooks.score_seconds
        scores = list(hooks.scores)
    if method.scorer is None:
        return Prefill(cache_of(out), scores, out.logits[:, -1], len(ids), elapsed - score_s, score_s)
    prefill_s = elapsed - score_s
    start = time.perf_counter()
    rescored = method.scorer.after_prefill(model, cache_of(out), list(ids))  # KVzip: its reconstruction forwards
    if rescored is not None:
        scores = [None if s is None else s.float() for s in rescored]
        _sync(device)
        score_s += time.perf_counter() - start
    scores = method.scorer.finish_prefill(scores)
    return Prefill(cache_of(out), scores, out.logits[:, -1], len(ids), prefill_s, score_s,
                   method.scorer.row_extras(), method.scorer.prefill_kept(), int(positions[0, -1]) + 1)


@dataclass
class ChunkedPrefill:
    """A prefill already compressed to one ratio's budget (``chunked_prefill``)."""

    prefill: Prefill
    budgets: Tensor  # [L, H] of the last compression step
    kept: list[Tensor]  # per layer, [H, n]: prompt positions of the cached entries
    compress_s: float  # scoring and planning time of every step


@torch.no_grad()
def chunked_prefill(model, hooks: Hooks, ids: list[int], method: Method, seed: int, keep_ratio: float,
                    n_question: int = 0) -> ChunkedPrefill:
    """The prompt prefilled ``method.prefill_chunk`` tokens at a time, the cache compressed back to the budget after
    every chunk, so it never holds more than budget + chunk entries per head (real chunked prefill: later chunks
    attend to the compressed cache, unlike kvpress's BlockPress, which computes the whole prefill first and
    simulates the blocks on its keys).

    The schedule is BlockPress's (the KeyDiff paper's block prompt processing): the first ``budget`` tokens fill
    the cache, then each chunk is appended and the method scores the cached entries plus the chunk (its queries
    are the chunk's) and keeps ``budget`` of them, ``budget = n_keep(T, keep_ratio)`` of the whole prompt. Every
    layer and head keeps that count (``Method`` refuses per-head and per-layer allocators: a budget shaped for the
    cache at hand is not the prompt's), so the cache stays dense for the next chunk."""
    device = model.device
    method.scorer.begin_prefill(list(ids), n_question)
    n_tokens, chunk = len(ids), int(method.prefill_chunk)
    budget = n_keep(n_tokens, keep_ratio, method.budget_rule)
    bounds = [0, min(budget, n_tokens)] + list(range(budget + chunk, n_tokens, chunk)) + [n_tokens]
    bounds = sorted(set(bounds))
    cache: DynamicCache = DynamicCache()
    positions: list[Tensor] | None = None
    budgets = torch.zeros(0, dtype=torch.long)
    prefill_s = compress_s = 0.0
    extras: dict[str, Any] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        step = torch.tensor([ids[start:end]], device=device)
        _sync(device)
        began = time.perf_counter()
        hooks.query_start = start
        try:
            with hooks.scoring(method.scorer, seed, method.allocator):
                out = model(input_ids=step, position_ids=torch.arange(start, end, device=device)[None],
                            **with_cache(cache), use_cache=True, logits_to_keep=1)
                _sync(device)
                elapsed, score_s = time.perf_counter() - began, hooks.score_seconds
                scores = method.scorer.finish_prefill(list(hooks.scores))
        finally:
            hooks.query_start = 0
        prefill_s += elapsed - score_s
        cache = cache_of(out)
        new = torch.arange(start, end)
        n_heads = cache.layers[0].keys.shape[1]
        positions = ([new.expand(n_heads, -1)] * len(cache.layers) if positions is None
                     else [torch.cat([p, new.expand(p.shape[0], -1)], dim=1) for p in positions])
        began = time.perf_counter()
        held = positions[0].shape[-1]
        if end > budget and held > budget:
            # the allocator asked for a ratio of the cache at hand whose count is exactly ``budget`` under either
            # budget rule (the half-entry margin absorbs the rules' rounding)
            budgets, kept = method.plan(scores, min(1.0, (budget + 0.5) / held))
            for layer, idx in enumerate(kept):
                if isinstance(idx, list):
                    raise ValueError(f"method.prefill_chunk: layer {layer} came back ragged (per-head budgets)")
                if idx is not None:
                    positions[layer] = positions[layer].gather(1, idx.cpu())
            cache = prune(cache, kept, method.merge)
        compress_s += score_s + time.perf_counter() - began
        extras = method.scorer.row_extras()
    pre = Prefill(cache, [], out.logits[:, -1], n_tokens, prefill_s, 0.0, extras)
    if budgets.numel() == 0:  # nothing was evicted (budget >= prompt)
        budgets = torch.tensor(kept_per_head(cache), dtype=torch.long)
    return ChunkedPrefill(pre, budgets, positions, compress_s)


def full_cache_bytes(cache: DynamicCache, n_tokens: int) -> int:
    """Bytes the uncompressed cache of ``n_tokens`` takes (also when a method shortened layers during prefill)."""
    total = 0
    for layer in cache.layers:
        batch, n_heads, _, dim = layer.keys.shape
        total += 2 * batch * n_heads * n_tokens * dim * layer.keys.element_size()
    return total


@torch.no_grad()
def decode(model, cache: DynamicCache, tail: list[int], last_logits: Tensor, start_pos: int, max_new_tokens: int,
           tokenizer, stop_strings: list[str], compressor: DecodeCompressor | None = None) -> Generation:
    """Greedy decoding on a (pruned) cache with explicit positions.

    ``tail`` (the question, when compression happened before it) is fed first as one multi-token step;
    otherwise the first token comes from the prefill's last logits. ``compressor`` (``harness.decoding``) is told
    of every step: it records the cache's footprint and, when decoding compresses, cuts the cache.
    """
    device = model.device
    _sync(device)
    start = time.perf_counter()
    logits = feed_tail(model, cache, tail, last_logits, start_pos)
    after_step = compressor.after_step if compressor is not None else None
    if compressor is not None:
        compressor.begin()  # the cache after the prefill's cut and the question, before any decode-time cut
        if tail:
            compressor.after_step(start_pos, len(tail), True)
    generated = greedy(model, cache, logits, start_pos + len(tail), max_new_tokens, eos_ids(model, tokenizer),
                       stop_check(tokenizer, stop_strings), after_step=after_step)
    _sync(device)
    elapsed = time.perf_counter() - start
    footprint = {}
    if compressor is not None:
        footprint = footprint_fields(compressor.finish(), len(generated), elapsed)
    return Generation(generated, tokenizer.decode(generated, skip_special_tokens=True), elapsed, footprint)


def feed_tail(model, cache, tail: list[int], last_logits: Tensor, start_pos: int) -> Tensor:
    """The question of a query-agnostic run fed on the pruned cache as one multi-token step from ``start_pos``;
    returns the logits the first generated token comes from (the prefill's last ones when there is no tail)."""
    if not tail:
        return last_logits
    device = model.device
    out = model(input_ids=torch.tensor([tail], device=device),
                position_ids=torch.arange(start_pos, start_pos + len(tail), device=device)[None],
                **with_cache(cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def stop_check(tokenizer, stop_strings: list[str]) -> Callable[[list[int]], bool] | None:
    """Whether a generation's text so far contains a stop string (None when there are none)."""
    if not stop_strings:
        return None
    return lambda tokens: any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stop_strings)


def take_token(tokens: list[int], token: int, eos: set[int], stop: Callable[[list[int]], bool] | None,
               max_new_tokens: int, keep_eos: bool = False) -> bool:
    """One greedy step's rule: appends ``token`` to ``tokens`` unless it is an EOS token that is not kept, and
    returns whether the generation goes on (no EOS, no stop string, fewer than ``max_new_tokens`` tokens)."""
    if token in eos and not keep_eos:
        return False
    tokens.append(token)
    return not (token in eos or (stop is not None and stop(tokens)) or len(tokens) >= max_new_tokens)


@torch.no_grad()
def greedy(model, cache, logits: Tensor, pos: int, max_new_tokens: int, eos: set[int],
           stop: Callable[[list[int]], bool] | None = None, keep_eos: bool = False,
           chosen_from: list[Tensor] | None = None,
           after_step: Callable[[int, int], None] | None = None) -> list[int]:
    """The greedy loop of every generation (kvbench's decoding, kvbench-train's teacher, the reference model's
    evaluation): the argmax of ``logits`` (the last position's, ``[1, V]`` or ``[V]``) is the next token, fed one at
    a time on ``cache`` at explicit positions from ``pos``. Up to ``max_new_tokens`` tokens; an EOS token ends it
    (not returned, or returned as the last token with ``keep_eos``), and so does ``stop(tokens)`` after a token.
    ``chosen_from`` receives the logits each returned token was the argmax of; ``after_step(position, 1)`` is
    called after each forward (decode-time compression, ``harness.decoding``)."""
    device = model.device
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax(dim=-1))
        held = len(tokens)
        going = take_token(tokens, token, eos, stop, max_new_tokens, keep_eos)
        if chosen_from is not None and len(tokens) > held:
            chosen_from.append(logits)
        if not going:
            break
        out = model(input_ids=torch.tensor([[token]], device=device), position_ids=torch.tensor([[pos]], device=device),
                    **with_cache(cache), use_cache=True)
        logits = out.logits[:, -1]
        if after_step is not None:
            after_step(pos, 1)
        pos += 1
    return tokens


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a generation: the model's generation config's ``eos_token_id`` (one or a list), else
    the tokenizer's."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}


def run_sample(model, tokenizer, hooks: Hooks, method: Method, ctx_ids: list[int], q_ids: list[int],
               keep_ratios: list[float], query_aware: bool, max_new_tokens: int, stop_strings: list[str],
               seed: int, keep_indices: bool = False, batch: "DecodeBatch | None" = None) -> list[Outcome]:
    """Outcomes for each keep ratio of one prompt (context ids, question ids). With ``batch``, the prompt is
    prefilled and cut now and decoded with the batch's other samples: the list fills at ``batch.flush()``."""
    prompt = ctx_ids + q_ids if query_aware else ctx_ids
    tail = [] if query_aware else q_ids
    return _run(model, tokenizer, hooks, method, prompt, [tail], keep_ratios, max_new_tokens, stop_strings, seed,
                keep_indices, len(q_ids) if query_aware else 0, batch)[0]


def run_questions(model, tokenizer, hooks: Hooks, method: Method, ctx_ids: list[int], questions: list[list[int]],
                  keep_ratios: list[float], max_new_tokens: int, stop_strings: list[str], seed: int,
                  keep_indices: bool = False, batch: "DecodeBatch | None" = None) -> list[list[Outcome]]:
    """Several questions about one context (``questions_per_context``): the context is prefilled and compressed
    once per keep ratio (once for all ratios where the method shares its scores), and each question is answered
    from its own copy of the pruned cache, so no question sees another's tokens: the same answers as one
    query-agnostic run per question. Outcomes per question, then per ratio; each carries the context's whole
    prefill and compress times (shared by the questions) and its own decode time."""
    return _run(model, tokenizer, hooks, method, ctx_ids, questions, keep_ratios, max_new_tokens, stop_strings,
                seed, keep_indices, 0, batch)


def _decode_each(model, tokenizer, hooks: Hooks, method: Method, cache, tails: list[list[int]], last_logits: Tensor,
                 start_pos: int, max_new_tokens: int, stop_strings: list[str], seed: int, target: int,
                 kept: list | None) -> list[Generation]:
    """Each tail decoded on ``cache``: the last one on the cache itself, the others on a copy of it (decoding
    appends to the cache it is given, and decode-time compression cuts it). ``target``: the entries per head
    decode-time compression cuts back to (``method.decoding``); ``kept``: the prefill's kept indices per layer
    (None after a chunked prefill), for a scorer that carries its prefill scores into decoding."""
    out = []
    for j, tail in enumerate(tails):
        own = cache if j == len(tails) - 1 else copy.deepcopy(cache)
        patch = method.scorer.decode_patch(model, own) if method.scorer is not None else nullcontext()
        compressor = DecodeCompressor(method, method.decoding, target, hooks.modules, own, seed, hooks.rotary)
        if method.decoding.compresses_decoding:
            method.scorer.begin_decoding(kept)
            hooks.decoding = compressor
        try:
            with patch:
                out.append(decode(model, own, tail, last_logits, start_pos, max_new_tokens, tokenizer, stop_strings,
                                  compressor))
        finally:
            hooks.decoding = None
    return out


def _run(model, tokenizer, hooks: Hooks, method: Method, prompt: list[int], tails: list[list[int]],
         keep_ratios: list[float], max_new_tokens: int, stop_strings: list[str], seed: int, keep_indices: bool,
         n_question: int, batch: "DecodeBatch | None" = None) -> list[list[Outcome]]:
    """Outcomes [tail][ratio] of ``prompt`` prefilled and compressed, then each tail decoded on its own cache (now,
    or with ``batch``'s other samples when it flushes)."""
    outcomes: list[list[Outcome]] = [[] for _ in tails]

    def decode_cut(cut: _Cut) -> None:
        if batch is not None:
            batch.add(cut, prompt, tails, max_new_tokens, stop_strings, keep_indices, outcomes)
        else:
            _decode_cut(model, tokenizer, hooks, method, cut, prompt, tails, max_new_tokens, stop_strings, seed,
                        keep_indices, outcomes)

    new_meter = (lambda: batch.meter) if batch is not None else (lambda: MemoryMeter(model.device))
    if method.compresses and method.prefill_chunk is not None:
        for ratio in keep_ratios:
            decode_cut(_chunked_cut(model, hooks, method, prompt, ratio, seed, n_question, new_meter()))
        return outcomes
    # Decode-time compression scores the cache with the scorer again, which may rewrite what its prefill left for
    # the next ratio's cut (CriticalKV's norms, SimLayerKV's laziness): a shared prefill is then cut at every ratio
    # before any ratio decodes.
    cut_first = method.decoding.compresses_decoding and method.shares_across_ratios
    shared: Prefill | None = None
    pending: list[_Cut] = []
    for i, ratio in enumerate(keep_ratios):
        meter = new_meter()
        if shared is None or not method.shares_across_ratios:
            shared = prefill(model, hooks, prompt, method, seed, ratio, n_question)
            prefill_s, score_s = shared.prefill_s, shared.score_s
        else:  # this ratio reuses the first ratio's prefill and scores
            prefill_s, score_s = 0.0, 0.0
        meter.sample()
        cut = _cut(method, hooks, shared, prompt, ratio, meter, prefill_s, score_s)
        if i == len(keep_ratios) - 1 or not method.shares_across_ratios:
            shared = None  # nothing else needs the full cache: free it before decoding so peak memory is honest
        pending.append(cut)
        if not cut_first or i == len(keep_ratios) - 1:
            for done in pending:
                decode_cut(done)
            pending = []
    return outcomes


@dataclass
class _Cut:
    """One ratio's pruned cache and what its outcome reports, before decoding."""

    ratio: float
    cache: DynamicCache
    budgets: Tensor | None
    kept: list | None  # the plan's kept indices per layer, which decoding's online scorers carry on (None: none)
    reported_kept: list | None  # what rows report as kept (``keep_indices``)
    start_pos: int
    last_logits: Tensor
    extras: dict
    full_bytes: int
    prefill_s: float
    compress_s: float
    meter: MemoryMeter


def _cut(method: Method, hooks: Hooks, shared: Prefill, prompt: list[int], ratio: float, meter: MemoryMeter,
         prefill_s: float, score_s: float) -> _Cut:
    device = shared.last_logits.device
    full_bytes = full_cache_bytes(shared.cache, shared.n_tokens)
    _sync(device)
    start = time.perf_counter()
    budgets, kept = (method.plan(shared.scores, method.decoding.prefill_ratio(len(prompt), ratio))
                     if method.compresses and method.decoding.compresses_prefill
                     else (None, [None] * len(shared.cache.layers)))
    # a merging method folds evicted entries in; a channel-pruning one (ThinK) stores fewer key channels
    cache = prune(shared.cache, kept, method.merge, method.key_channels(ratio))
    positions = kept_positions(kept, shared.prefill_kept, shared.cache) if method.rerotate_keys else None
    _sync(device)
    compress_s = score_s + time.perf_counter() - start
    start_pos = len(prompt) if shared.next_position is None else shared.next_position
    if positions is not None and method.compresses and method.decoding.compresses_prefill:
        start_pos = rerotate(cache, positions, hooks.rotary.inv_freq)
    return _Cut(ratio, cache, budgets, kept, _diagnostic_kept(kept, shared.prefill_kept), start_pos,
                shared.last_logits, shared.extras, full_bytes, prefill_s, compress_s, meter)


def _decode_cut(model, tokenizer, hooks: Hooks, method: Method, cut: _Cut, prompt: list[int],
                tails: list[list[int]], max_new_tokens: int, stop_strings: list[str], seed: int, keep_indices: bool,
                outcomes: list[list[Outcome]]) -> None:
    """Each tail decoded on one ratio's cut; its outcomes appended to ``outcomes[tail]``."""
    per_head = kept_per_head(cut.cache)
    kv_bytes = cache_bytes(cut.cache)
    gens = _decode_each(model, tokenizer, hooks, method, cut.cache, tails, cut.last_logits, cut.start_pos,
                        max_new_tokens, stop_strings, seed,
                        method.decoding.target(len(prompt), cut.ratio, method.budget_rule), cut.kept)
    cut.meter.sample()
    _append_outcomes(cut, per_head, kv_bytes, len(prompt), gens, keep_indices, outcomes)
    cut.cache = None  # freed before the next ratio decodes


def _append_outcomes(cut: _Cut, per_head: list[list[int]], kv_bytes: int, n_prompt: int, gens: list[Generation],
                     keep_indices: bool, outcomes: list[list[Outcome]]) -> None:
    """One ratio's outcomes, one per tail (``gens[j]``), appended to ``outcomes[j]``; ``per_head`` / ``kv_bytes``:
    the cut cache before decoding."""
    n_heads = sum(len(h) for h in per_head)
    peak = cut.meter.delta()
    for j, gen in enumerate(gens):
        outcomes[j].append(Outcome(
            keep_ratio=cut.ratio, prediction=gen.text, context_tokens=n_prompt,
            kept_tokens=sum(sum(h) for h in per_head) / n_heads, kv_bytes=kv_bytes, kv_bytes_full=cut.full_bytes,
            prefill_s=cut.prefill_s, compress_s=cut.compress_s, decode_s=gen.decode_s, peak_mem_bytes=peak,
            budgets=cut.budgets.tolist() if cut.budgets is not None else [],
            kept=cut.reported_kept if keep_indices else None, extras=cut.extras,
            footprint=gen.footprint,
        ))


def _chunked_cut(model, hooks: Hooks, method: Method, prompt: list[int], ratio: float, seed: int,
                 n_question: int, meter: MemoryMeter) -> _Cut:
    """One ratio's cut with ``method.prefill_chunk``: the cache is compressed while the prompt is prefilled."""
    done = chunked_prefill(model, hooks, prompt, method, seed, method.decoding.prefill_ratio(len(prompt), ratio),
                           n_question)
    meter.sample()
    cache = done.prefill.cache
    start_pos = rerotate(cache, done.kept, hooks.rotary.inv_freq) if method.rerotate_keys else len(prompt)
    # no plan indices for decoding to carry on (the last chunk's scores cover a chunk, not the cache); rows report
    # the prompt positions kept
    return _Cut(ratio, cache, done.budgets, None, list(done.kept), start_pos, done.prefill.last_logits,
                {**done.prefill.extras, "prefill_chunk": method.prefill_chunk}, full_cache_bytes(cache, len(prompt)),
                done.prefill.prefill_s, done.compress_s, meter)


def kept_positions(kept: list, prefill_kept: list | None, cache: DynamicCache) -> list[Tensor]:
    """Per layer, ``[H, n]`` prompt positions of the entries ``prune(cache, kept)`` holds, ``cache`` being the
    prefill's (a layer kept whole: all of them, or those its prefill cut it to)."""
    out = []
    for layer, (idx, cache_layer) in enumerate(zip(kept, cache.layers)):
        if isinstance(idx, list):
            raise ValueError("rerotate_keys needs one kept count per layer; this method kept a ragged layer")
        n_heads, held = cache_layer.keys.shape[1], cache_layer.keys.shape[2]
        cut = prefill_kept[layer] if prefill_kept is not None else None
        # a prefill's cut is one set of positions for the layer ([n]) or one per head ([H, n]: FastKV's SnapKV
        # among the propagated tokens)
        base = torch.arange(held) if cut is None else torch.as_tensor(cut).cpu()
        base = base.reshape(-1).expand(n_heads, -1) if base.dim() < 2 or base.shape[0] == 1 else base
        base = base.reshape(n_heads, -1)
        out.append(base if idx is None else base.gather(1, idx.cpu()))
    return out


def _diagnostic_kept(kept: list, prefill_kept: list | None) -> list:
    """Kept indices for diagnostics: layers the prefill already shortened report what it kept, not 'whole'."""
    if prefill_kept is None:
        return kept
    return [cut if k is None and cut is not None else k for k, cut in zip(kept, prefill_kept)]
