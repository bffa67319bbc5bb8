"""KVzip ("KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", Kim et al., arXiv:2505.23416):
an entry matters if the model needs it to repeat the context. After the prefill the model reads, on the prefilled
cache, a "repeat the previous context" prompt followed by the context itself; each cached entry of a KV head
scores the largest attention any reconstruction query of that head's group gives it. The score does not depend on
any question, so one prefill serves every later query and every keep ratio.

Mechanism (the official code, snu-mllab/KVzip ``model/wrapper.py`` + ``attention/score.py``; kvpress 0.5.5's
``KVzipPress`` is the same algorithm):

* the context (the prompt after its system part, ``P`` tokens: the chat template's head when the prompt starts
  with it) is cut into chunks of ``chunk_size`` tokens; chunk ``i`` is reconstructed by the forward of
  ``first_prompt`` (i = 0) or ``next_prompt`` + the previous chunk's last ``overlap`` tokens (i > 0), then the
  template's end of turn (the tokenizer's chat template after the user message; ``"\\n"`` without one), then the
  chunk, on the prefilled cache at positions ``T ..`` (the harness truncates what the forward appended);
* per layer the reconstruction queries attend, in one softmax, to the sinks, the chunk's cached entries and the
  reconstruction tokens themselves (causal) -- not to the rest of the context, which bounds memory by the chunk;
* score of a chunk entry = max over the group's query heads and the reconstruction positions of that softmax;
  ``kvzip_plus``: each row divided by ``||h||`` of its query token, each column times ``||W_O v||`` of its value
  (kvpress's KVzip+ normalisation);
* budgets (allocator ``global``): one top-k over every layer and KV head of the model (the official code's
  ``pair`` level, kvpress's ``layerwise=False``), so layers and heads keep different numbers of entries.

Our defaults are the official code's: ``chunk_size`` 2000, the system prompt (``n_sink: null``: the template's
head, or the BOS token without a template, as the official fallback template is BOS alone) is both the softmax's
sinks and never evicted (the official code keeps it outside the evicted range; here it sits inside the budget,
scored +inf, since our ratio counts every cached token), ``next_prompt`` ends with a space.

``method.preset=kvpress`` (kvpress 0.5.5's ``KVzipPress`` defaults): ``chunk_size`` 2048; ``n_sink`` 4: the first
``min(4, chunk start)`` tokens are the softmax's sinks (none in the first chunk without a template) and the
selector keeps the first 4 tokens, while system-prompt tokens beyond them score 0 (kvpress never reconstructs
them, so they go first); ``next_prompt`` without the trailing space; kvpress's counts (the model keeps
``N - int(N * cr)`` of its ``N = L * H * T`` entries). Both compute the softmax in float32 (kvpress: in the model's
dtype; equal on float32 models) with ``1 / sqrt(head_dim)``.

The prompts are encoded by ``tokenizer`` (a model dir; null = the model's own: its checkpoint dir, or the byte
tokenizer of ``model=tiny-random``); kvpress likewise loads ``AutoTokenizer.from_pretrained(name_or_path)``.
The reconstruction runs in ``Scorer.after_prefill`` (harness.pipeline.prefill calls it after the prefill's
forward); the prefill's own attention is not scored.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from harness.attention import attention_masks, attention_modules, stash_hidden
from harness.compat import with_cache
from harness.compress import Allocator, Scorer, kept_fraction, register_allocator, register_scorer
from harness.errors import KvbenchError
from harness.paths import find_input
from harness.schema import Count, Flag, NonNegative

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "  # official: trailing space
KVPRESS_NEXT_PROMPT = NEXT_PROMPT.rstrip(" ")


def template_parts(tokenizer) -> tuple[list[int], list[int]]:
    """Ids of the chat template's head (before the user's message) and of its end of turn + assistant header
    (after it), found as kvpress finds them (a dummy message and a separator); ``([], "\\n")`` without a
    template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return [], list(tokenizer.encode("\n", add_special_tokens=False))
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    head, suffix = text.split(separator)
    prefix = head.split(dummy)[0]
    return (list(tokenizer.encode(prefix, add_special_tokens=False)),
            list(tokenizer.encode(suffix, add_special_tokens=False)))


def chunks_of(n_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each reconstructed chunk of a context of ``n_tokens`` (the last one shorter)."""
    return [(s, min(s + chunk_size, n_tokens)) for s in range(0, n_tokens, chunk_size)]


def reconstruction_scores(queries: Tensor, keys: Tensor, n_sink: int, start: int, end: int,
                          row_weight: Tensor | None = None, col_weight: Tensor | None = None) -> Tensor:
    """KVzip's score of the cached entries ``start .. end`` of one layer: ``[B, H_kv, end - start]``.

    ``queries`` ``[B, H_q, n, D]`` are the reconstruction tokens' (after RoPE), ``keys`` ``[B, H_kv, T + n, D]`` the
    cache with them appended. One softmax per query over the ``n_sink`` first entries, the chunk and the
    reconstruction tokens (causal); max over the group's heads and the rows. ``row_weight`` ``[B, n]`` and
    ``col_weight`` ``[B, H_q, n_sink + chunk + n]`` multiply the probabilities (KVzip+), before the max.
    """
    batch, n_q_heads, n, dim = queries.shape
    n_kv = keys.shape[1]
    group = n_q_heads // n_kv
    chunk = end - start
    sel = torch.cat([keys[:, :, :n_sink], keys[:, :, start:end], keys[:, :, -n:]], dim=2).float()
    causal = torch.ones(n, n, dtype=torch.bool, device=keys.device).triu(1)  # True = a later token: masked
    out = []
    for h in range(n_kv):  # one KV head at a time: memory [group, n, n_sink + chunk + n]
        q = queries[:, h * group:(h + 1) * group].float()
        logits = q @ sel[:, h, None].transpose(-1, -2) / math.sqrt(dim)
        logits[..., -n:] = logits[..., -n:].masked_fill(causal, float("-inf"))
        probs = logits.softmax(dim=-1)
        if row_weight is not None:
            probs = probs * row_weight[:, None, :, None]
        if col_weight is not None:
            probs = probs * col_weight[:, h * group:(h + 1) * group, None, :]
        out.append(probs[..., n_sink:n_sink + chunk].amax(dim=(1, 2)))
    return torch.stack(out, dim=1)


def value_output_norms(module: nn.Module, values: Tensor) -> Tensor:
    """``||W_O^{(q)} v||`` for every query head ``q`` and value ``v`` of its KV head: ``[B, H_q, n]``."""
    batch, n_kv, n, dim = values.shape
    weight = module.o_proj.weight.float()  # [hidden, H_q * D]
    n_q_heads = weight.shape[1] // dim
    group = n_q_heads // n_kv
    w = weight.view(weight.shape[0], n_kv, group, dim)
    return torch.einsum("jhgi,bhti->bhgtj", w, values.float()).norm(dim=-1).reshape(batch, n_q_heads, n)


def resolve_tokenizer(path: str | None, model: nn.Module):
    """The tokenizer of the reconstruction prompts: ``path`` (a model or tokenizer dir), else the model's own
    (its checkpoint dir; the byte tokenizer of a model built from a config, ``model=tiny-random``)."""
    from harness.models import load_tokenizer

    if path is not None:
        found = find_input(path, Path.is_dir)
        if found is None:
            raise KvbenchError(f"method.scorer.tokenizer={path!r} is not a directory; pass a model or tokenizer dir")
        return load_tokenizer(str(found))
    own = str(getattr(model.config, "name_or_path", "") or "")
    if not own:
        from harness.tokenizer import byte_tokenizer

        return byte_tokenizer()
    if not Path(own).is_dir():
        raise KvbenchError(f"KVzip needs the model's tokenizer to encode its reconstruction prompt; {own!r} is not "
                           "a local dir: pass method.scorer.tokenizer=<dir>")
    return load_tokenizer(own)


@register_scorer("kvzip")
class KVzipScorer(Scorer):
    supports_chunked_prefill = False  # its scores come from reconstruction forwards over the whole prefill
    supports_decoding = False  # likewise: its reconstruction forwards run after the prefill only
    PRESETS = {"kvpress": {"scorer": {"chunk_size": 2048, "n_sink": 4, "next_prompt": KVPRESS_NEXT_PROMPT},
                           "selector": {"n_sink": 4}, "budget_rule": "kvpress"}}

    def __init__(self, chunk_size: Count = 2000, n_sink: NonNegative | None = None, overlap: NonNegative = 8,
                 first_prompt: str = FIRST_PROMPT, next_prompt: str = NEXT_PROMPT, kvzip_plus: Flag = False,
                 tokenizer: str | None = None):
        self.chunk_size = int(chunk_size)
        self.n_sink = None if n_sink is None else int(n_sink)
        self.overlap = int(overlap)
        self.first_prompt, self.next_prompt = str(first_prompt), str(next_prompt)
        self.kvzip_plus = bool(kvzip_plus)
        self.tokenizer = tokenizer
        if tokenizer is not None and find_input(tokenizer, Path.is_dir) is None:
            raise KvbenchError(f"method.scorer.tokenizer={tokenizer!r} is not a directory; pass a model or tokenizer dir")
        self._tok: Any = None
        self._tok_for: int | None = None

    def input_files(self) -> dict[str, Path]:
        if self.tokenizer is None:
            return {}
        found = find_input(self.tokenizer, Path.is_dir)
        file = found / "tokenizer.json" if found is not None else None
        return {"method.scorer.tokenizer": file} if file is not None and file.is_file() else {}

    def use_tokenizer(self, tokenizer, model: nn.Module) -> None:
        """Encode the prompts with ``tokenizer`` on ``model`` (a command that has the model's tokenizer at hand)."""
        self._tok, self._tok_for = tokenizer, id(model)

    def bind_model(self, model: nn.Module) -> None:
        self._tokenizer(model)  # a missing or bad tokenizer is refused before the run starts

    def score(self, inputs) -> None:
        return None  # the prefill's own attention is not used: after_prefill scores by reconstruction

    def _tokenizer(self, model: nn.Module):
        if self._tok is None or self._tok_for != id(model):
            self._tok, self._tok_for = resolve_tokenizer(self.tokenizer, model), id(model)
        return self._tok

    def system_length(self, ids: list[int], prefix: list[int], bos: int | None) -> int:
        """``P``, the prompt's system part: the template's head where the prompt starts with it; without (and
        only under ``n_sink: null``, the official layout) the BOS token that starts the prompt; else 0."""
        if prefix and ids[:len(prefix)] == prefix:
            return len(prefix)
        if self.n_sink is None and bos is not None and ids and ids[0] == bos:
            return 1
        return 0

    def replays(self, ids: list[int], tok) -> tuple[int, list[tuple[int, int, list[int]]]]:
        """``(P, [(start, end, replay ids)])``: the prompt's system length and each chunk's reconstruction input
        (``start .. end`` are prompt positions)."""
        prefix, suffix = template_parts(tok)
        n_sys = self.system_length(ids, prefix, getattr(tok, "bos_token_id", None))
        context = ids[n_sys:]
        out = []
        spans = chunks_of(len(context), self.chunk_size)
        for i, (s, e) in enumerate(spans):
            if i == 0:
                head = list(tok.encode(self.first_prompt, add_special_tokens=False))
            else:
                prev = context[spans[i - 1][0]:spans[i - 1][1]]
                head = list(tok.encode(self.next_prompt, add_special_tokens=False))
                head += prev[-self.overlap:] if self.overlap else []
            out.append((n_sys + s, n_sys + e, head + suffix + context[s:e]))
        return n_sys, out

    @torch.no_grad()
    def after_prefill(self, model: nn.Module, cache, ids: list[int]) -> list[Tensor]:
        n_tokens = len(ids)
        modules = attention_modules(model)
        first = cache.layers[0].keys
        n_kv = first.shape[1]
        scores = [torch.zeros(first.shape[0], n_kv, n_tokens, device=first.device) for _ in modules]
        n_sys, replays = self.replays(list(ids), self._tokenizer(model))
        hidden: dict[int, Tensor] = {}
        state: dict[str, Any] = {}
        seen: set[int] = set()

        def observe(module: nn.Module, query: Tensor, key: Tensor):
            """The reconstruction's attention of one layer: score its chunk (no mask of our own: None)."""
            layer = module.layer_idx
            start, end, n = state["start"], state["end"], query.shape[2]
            n_sink = n_sys if self.n_sink is None else min(self.n_sink, start)
            rows = cols = None
            if self.kvzip_plus:
                values = cache.layers[layer].values
                rows = 1.0 / hidden[layer].float().norm(dim=-1)
                sel = torch.cat([values[:, :, :n_sink], values[:, :, start:end], values[:, :, -n:]], dim=2)
                cols = value_output_norms(module, sel)
            scores[layer][..., start:end] = reconstruction_scores(query, key, n_sink, start, end, rows, cols)
            seen.add(layer)
            return None

        handles = stash_hidden(modules, hidden) if self.kvzip_plus else []
        try:
            with attention_masks(modules, observe):
                for start, end, replay in replays:
                    state.update(start=start, end=end)
                    x = torch.tensor([replay], device=first.device)
                    pos = torch.arange(n_tokens, n_tokens + len(replay), device=first.device)[None]
                    try:
                        model(input_ids=x, position_ids=pos, **with_cache(cache), use_cache=True, logits_to_keep=1)
                    finally:  # the cache the harness keeps: exactly the prefill's entries again
                        for layer in cache.layers:
                            layer.keys, layer.values = layer.keys[:, :, :n_tokens], layer.values[:, :, :n_tokens]
        finally:
            for h in handles:
                h.remove()
        for layer in cache.layers:  # drop the storage the reconstruction tokens held
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
        if replays and len(seen) != len(modules):
            raise RuntimeError("KVzip's reconstruction saw no attention: run it under harness.attention.install")
        if self.n_sink is None and n_sys:
            for s in scores:
                s[..., :n_sys] = math.inf  # the system prompt is never evicted (the official evict range)
        return scores


def global_budgets(scores: list[Tensor], keep_ratio: float, rule: str, scope: str = "model") -> Tensor:
    """Budgets ``[L, H]``: the number of each (layer, head)'s entries among the top ``n`` of all scores of its
    scope: every entry of the model (``scope='model'``), of its layer (``'layer'``) or of its head (``'head'``: the
    uniform budget). ``n`` of ``N`` entries: ``floor(N * keep)`` (floor), or kvpress's ``N - int(N * cr)`` with
    ``cr = 1 - keep`` (kvpress). Every head keeps at least one entry (taken from the first largest budget of its
    scope; kvpress would mask a head whole)."""
    stacked = torch.nan_to_num(torch.stack([s.detach().float() for s in scores]), nan=-math.inf)  # [L, H, T]
    n_layers, n_heads, n_tokens = stacked.shape
    groups = {"model": stacked.reshape(1, -1), "layer": stacked.reshape(n_layers, -1),
              "head": stacked.reshape(n_layers * n_heads, -1)}[scope]
    out = torch.zeros(groups.shape[0], groups.shape[1] // n_tokens, dtype=torch.long)
    for g, flat in enumerate(groups):
        total = flat.numel()
        if rule == "kvpress":  # kvpress prunes int(N * cr) entries, cr = 1 - keep as the caller typed it
            n = total - int(total * (1.0 - float(keep_ratio)))
        else:
            n = math.floor(total * kept_fraction(keep_ratio, rule) + 1e-6)
        kept = flat.topk(max(1, min(total, n))).indices
        out[g] = torch.bincount(kept // n_tokens, minlength=out.shape[1]).cpu()
        while bool((out[g] == 0).any()):
            empty = int((out[g] == 0).nonzero()[0])
            out[g, empty] += 1
            out[g, int(out[g].argmax())] -= 1
    return out.reshape(n_layers, n_heads)


@register_allocator("global")
class GlobalAllocator(Allocator):
    """One top-k over every layer and KV head (KVzip, FastKVzip, KVzap's threshold): layers and heads keep
    different counts. ``scope: layer``: one top-k per layer over its heads (kvpress's ``layerwise=True``, AdaKV
    without a floor); ``scope: head``: every head its own top-k, the uniform budget (kvpress's ScorerPress)."""

    per_head_budgets = True
    per_layer_budgets = True

    def __init__(self, scope: Literal["model", "layer", "head"] = "model"):
        self.scope = str(scope)

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:
        return global_budgets(scores, keep_ratio, self.budget_rule, self.scope)
