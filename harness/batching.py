"""Batched evaluation (``batch_size=N``): several samples' generations decoded together.

Each sample is still prefilled, scored and cut on its own (a scorer sees exactly the one prompt it sees at batch
size 1, so kept entries cannot change); what is batched is decoding, which on a GPU (and on a small model on a
CPU) costs mostly per-step overhead. The cut caches of up to ``N`` generations are stacked into one left-padded
cache (``harness.cache.BatchLayer``: each (sample, KV head) keeps exactly its own entries, padding masked), every
sample at its own positions, and one forward per step serves them all; a sample that ends (EOS, a stop string,
its token limit) leaves the batch. Greedy decoding in float32 gives the rows of batch size 1 (tested).

What runs one generation at a time: decoding that compresses (``decoding.mode=decode|both``: each generation
cuts its own cache on its own schedule), a scorer that patches decoding (``Scorer.batches_decoding``: SP-KV's
gated layers), and caches with layers of their own (ThinK's channel-pruned keys).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from harness.attention import Hooks
from harness.cache import BatchLayer, RaggedLayer, cache_bytes, kept_per_head
from harness.compat import with_cache
from harness.compress import Method
from harness.decoding import footprint_fields, footprint_point
from harness.pipeline import (Generation, MemoryMeter, Outcome, _append_outcomes, _Cut, _decode_cut, _sync, eos_ids,
                              feed_tail, stop_check, take_token)


@dataclass
class Job:
    """One generation waiting for its batch: a cut cache (its own copy), the tail to feed, where it starts."""

    cache: DynamicCache
    tail: list[int]
    last_logits: Tensor
    start_pos: int
    max_new_tokens: int
    stop_strings: list[str]


@dataclass
class _Entry:
    cut: _Cut
    n_prompt: int
    tails: list[list[int]]
    max_new_tokens: int
    stop_strings: list[str]
    keep_indices: bool
    outcomes: list[list[Outcome]]
    per_head: list[list[int]]
    kv_bytes: int


def batchable(method: Method, cache: DynamicCache) -> bool:
    """Whether a cut cache can be decoded in a batch: decoding does not compress, the scorer does not patch
    decoding, and every layer is a plain dense or ragged one."""
    if method.decoding.compresses_decoding:
        return False
    if method.scorer is not None and not method.scorer.batches_decoding:
        return False
    return all(type(layer) in (DynamicLayer, RaggedLayer) for layer in cache.layers)


class DecodeBatch:
    """Collects the cuts of several samples (``harness.pipeline.run_sample(..., batch=...)``) and decodes their
    generations ``batch_size`` at a time at ``flush()``, which fills each sample's outcome lists. Rows of one batch
    share its peak memory (``MemoryMeter`` from the first prefill to the last decode); a generation's
    ``decode_s`` is its batch's decoding time divided by the generations in it (the cost per generation)."""

    def __init__(self, model, tokenizer, hooks: Hooks, method: Method, batch_size: int, seed: int):
        self.model, self.tokenizer, self.hooks, self.method = model, tokenizer, hooks, method
        self.batch_size, self.seed = int(batch_size), seed
        self.entries: list[_Entry] = []
        self._meter: MemoryMeter | None = None

    @property
    def meter(self) -> MemoryMeter:
        if self._meter is None:
            self._meter = MemoryMeter(self.model.device)
        return self._meter

    def add(self, cut: _Cut, prompt: list[int], tails: list[list[int]], max_new_tokens: int, stop_strings: list[str],
            keep_indices: bool, outcomes: list[list[Outcome]]) -> None:
        """One ratio's cut of one sample: held for the batch, or decoded now when it cannot be batched."""
        if not batchable(self.method, cut.cache):
            _decode_cut(self.model, self.tokenizer, self.hooks, self.method, cut, prompt, tails, max_new_tokens,
                        stop_strings, self.seed, keep_indices, outcomes)
            return
        self.entries.append(_Entry(cut, len(prompt), tails, max_new_tokens, list(stop_strings), keep_indices, outcomes,
                                   kept_per_head(cut.cache), cache_bytes(cut.cache)))

    def mark(self) -> int:
        return len(self.entries)

    def discard_after(self, mark: int) -> None:
        """Drop the cuts added since ``mark`` (a sample that failed before all its cuts were made)."""
        del self.entries[mark:]

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def flush(self) -> None:
        """Decode every held generation, ``batch_size`` at a time (caches of similar sizes together), and append
        each sample's outcomes."""
        entries, self.entries = self.entries, []
        try:
            self._decode(entries)
        finally:
            self._meter = None  # the next batch measures its own peak

    def _decode(self, entries: list[_Entry]) -> None:
        jobs: list[tuple[int, int, Job]] = []
        for e, entry in enumerate(entries):
            for j, tail in enumerate(entry.tails):  # the last tail decodes on the cut itself, the others on copies
                cache = entry.cut.cache if j == len(entry.tails) - 1 else copy.deepcopy(entry.cut.cache)
                jobs.append((e, j, Job(cache, tail, entry.cut.last_logits, entry.cut.start_pos, entry.max_new_tokens,
                                       entry.stop_strings)))
            entry.cut.cache = None
        order = sorted(range(len(jobs)), key=lambda i: max(n for layer in kept_per_head(jobs[i][2].cache)
                                                          for n in layer))
        gens: dict[tuple[int, int], Generation] = {}
        for start in range(0, len(order), self.batch_size):
            chunk = [jobs[i] for i in order[start:start + self.batch_size]]
            for (e, j, _), gen in zip(chunk, decode_together(self.model, self.tokenizer, [job for *_, job in chunk])):
                gens[(e, j)] = gen
            self.meter.sample()
        for e, entry in enumerate(entries):
            _append_outcomes(entry.cut, entry.per_head, entry.kv_bytes, entry.n_prompt,
                             [gens[(e, j)] for j in range(len(entry.tails))], entry.keep_indices, entry.outcomes)


def _entry_bytes(cache: DynamicCache) -> int:
    """Bytes one more entry in every (layer, KV head) adds: a key and a value of each head."""
    total = 0
    for layer in cache.layers:
        keys = layer.head_keys if isinstance(layer, RaggedLayer) else [layer.keys]
        total += sum(2 * k.shape[1] * k.shape[-1] * k.element_size() for k in keys)
    return total


def _grown(point: dict, fed: int, entry_bytes: int) -> dict:
    """The footprint of a cache that grew by ``fed`` entries per head since ``point`` (nothing evicted)."""
    return {"generated": fed, "entries_mean": point["entries_mean"] + fed, "entries_max": point["entries_max"] + fed,
            "bytes": point["bytes"] + fed * entry_bytes}


@torch.no_grad()
def decode_together(model, tokenizer, jobs: list[Job]) -> list[Generation]:
    """Greedy generations of ``jobs`` in one batch: each tail fed on its own cache first (as batch size 1 does),
    then one forward per step for every generation still going, each at its own position
    (``harness.pipeline.take_token`` is the stopping rule of both paths)."""
    device = model.device
    _sync(device)
    start = time.perf_counter()
    eos = eos_ids(model, tokenizer)
    logits, positions, starts, grow = [], [], [], []
    for job in jobs:
        logits.append(feed_tail(model, job.cache, job.tail, job.last_logits, job.start_pos).reshape(1, -1))
        positions.append(job.start_pos + len(job.tail))
        starts.append(footprint_point(job.cache, 0))
        grow.append(_entry_bytes(job.cache))
    active = [i for i, job in enumerate(jobs) if job.max_new_tokens > 0]
    cache = DynamicCache()  # row r of every layer is the cache of jobs[active[r]]
    cache.layers = [BatchLayer.stack([jobs[j].cache.layers[i] for j in active])
                    for i in range(len(jobs[0].cache.layers))] if active else []
    for job in jobs:
        job.cache = None  # the batch holds the entries now
    stops = [stop_check(tokenizer, job.stop_strings) for job in jobs]
    tokens: list[list[int]] = [[] for _ in jobs]
    fed = [0] * len(jobs)
    step_logits = torch.cat(logits)[active]
    pos = torch.tensor([positions[i] for i in active], device=device)
    while active:
        choices = step_logits.argmax(dim=-1).tolist()
        going = [row for row, (i, token) in enumerate(zip(active, choices))
                 if take_token(tokens[i], token, eos, stops[i], jobs[i].max_new_tokens)]
        if not going:
            break
        if len(going) < len(active):  # those that ended leave the batch
            rows = torch.tensor(going, device=device)
            for layer in cache.layers:
                layer.select(rows)
            active, pos = [active[r] for r in going], pos[rows]
        ids = torch.tensor([[tokens[i][-1]] for i in active], device=device)
        out = model(input_ids=ids, position_ids=pos[:, None], **with_cache(cache), use_cache=True)
        step_logits = out.logits[:, -1]
        pos = pos + 1
        for i in active:
            fed[i] += 1
    _sync(device)
    decode_s = (time.perf_counter() - start) / len(jobs)
    gens = []
    for i, job in enumerate(jobs):
        points = [starts[i]] if fed[i] == 0 else [starts[i], _grown(starts[i], fed[i], grow[i])]
        gens.append(Generation(tokens[i], tokenizer.decode(tokens[i], skip_special_tokens=True), decode_s,
                               footprint_fields(points, len(tokens[i]), decode_s)))
    return gens
