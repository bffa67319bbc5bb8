"""KVgrad (https://openreview.net/forum?id=cg1wTCJjjk; kvpress 0.5.5's ``KVgradPress``): KVzip's context
reconstruction, with each entry scored by its input x gradient attribution to the model's last hidden states instead
of the reconstruction attention alone.

For the cached entry ``c`` of layer ``l`` (per KV head; max over the query heads of its group and the
reconstruction positions ``p``)::

    S_{l,c} = max_p  A^l_{p,c} * ||v^l_c W_O^l|| * ||d Phi / d a^l_p||,     Phi = sum_p ||h^L_p||^2

``A`` is KVzip's reconstruction attention (one softmax over the sinks, the chunk being reconstructed and the
reconstruction tokens, methods/kvzip.py), ``v W_O`` what the entry writes into the residual stream through its query
head's slice of the output projection, ``a^l_p`` the attention block's output at reconstruction token ``p`` (the
residual stream is ``residual + a``, so its gradient is the residual's), ``h^L`` the last decoder layer's output
(before the final norm). Per chunk: one forward of the reconstruction prompt on the prefilled cache with the model's
weights frozen and the prompt's embeddings as the leaf that carries the graph, then ``Phi.backward()``; the
appended entries are dropped again, the prefill cache is left as it was. Budgets: KVzip's one top-k over every layer
and head (allocator ``global``).

Defaults are kvpress's (the only implementation: ``chunk_size`` 512, 4 sinks, kvpress's prompts, no KVzip+
normalisation, which KVgrad's ``||v W_O||`` replaces); ``method.preset=kvpress`` switches the counts to kvpress's.
Everything else (chunks, prompts, template, tokenizer) is KVzip's scorer's. The attention is computed in float32 with
``1 / sqrt(head_dim)`` (kvpress: the model's dtype; equal on float32 models).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from harness.attention import attention_masks, attention_modules
from harness.compat import with_cache
from harness.compress import KVPRESS_COUNTS_ONLY, register_scorer
from harness.schema import Count, NonNegative
from methods.kvzip import FIRST_PROMPT, KVPRESS_NEXT_PROMPT, KVzipScorer, value_output_norms


def reconstruction_probs(queries: Tensor, keys: Tensor, n_sink: int, start: int, end: int) -> Tensor:
    """KVzip's reconstruction softmax restricted to the chunk's columns: ``[B, H_q, n, end - start]`` (float32), for
    queries ``[B, H_q, n, D]`` (after RoPE) over keys ``[B, H_kv, T + n, D]`` (the cache with them appended)."""
    n_q_heads, n, dim = queries.shape[1], queries.shape[2], queries.shape[3]
    group = n_q_heads // keys.shape[1]
    sel = torch.cat([keys[:, :, :n_sink], keys[:, :, start:end], keys[:, :, -n:]], dim=2).float()
    sel = sel.repeat_interleave(group, dim=1)
    logits = queries.float() @ sel.transpose(-1, -2) / math.sqrt(dim)
    causal = torch.ones(n, n, dtype=torch.bool, device=keys.device).triu(1)  # True = a later token: masked
    logits[..., -n:] = logits[..., -n:].masked_fill(causal, float("-inf"))
    return logits.softmax(dim=-1)[..., n_sink:n_sink + end - start]


def attribution_scores(probs: Tensor, value_norms: Tensor, grad_norms: Tensor, n_kv: int) -> Tensor:
    """``[B, H_kv, chunk]``: max over each KV head's query heads and the rows of ``A * ||v W_O|| * ||grad a||``, from
    ``probs [B, H_q, n, chunk]``, ``value_norms [B, H_q, chunk]``, ``grad_norms [B, n]``."""
    batch, n_q_heads, n, chunk = probs.shape
    scores = probs * value_norms[:, :, None, :] * grad_norms[:, None, :, None]
    return scores.reshape(batch, n_kv, (n_q_heads // n_kv) * n, chunk).amax(dim=2)


class _Frozen:
    """The model's parameters without ``requires_grad`` for the duration: the backward pass computes gradients of
    activations only and leaves no ``.grad`` on any weight."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


@register_scorer("kvgrad")
class KVgradScorer(KVzipScorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # defaults are kvpress 0.5.5's: preset=kvpress only sets its counts

    def __init__(self, chunk_size: Count = 512, n_sink: NonNegative | None = 4, overlap: NonNegative = 8,
                 first_prompt: str = FIRST_PROMPT, next_prompt: str = KVPRESS_NEXT_PROMPT, tokenizer: str | None = None):
        super().__init__(chunk_size=chunk_size, n_sink=n_sink, overlap=overlap, first_prompt=first_prompt,
                         next_prompt=next_prompt, kvzip_plus=False, tokenizer=tokenizer)

    def after_prefill(self, model: nn.Module, cache, ids: list[int]) -> list[Tensor]:
        n_tokens = len(ids)
        modules = attention_modules(model)
        decoder = model.get_decoder()
        first = cache.layers[0].keys
        n_kv = first.shape[1]
        scores = [torch.zeros(first.shape[0], n_kv, n_tokens, device=first.device) for _ in modules]
        n_sys, replays = self.replays(list(ids), self._tokenizer(model))
        state: dict[str, Any] = {}

        def observe(module: nn.Module, query: Tensor, key: Tensor):
            """The reconstruction's attention over the chunk (no mask of our own: None)."""
            start, end = state["start"], state["end"]
            n_sink = n_sys if self.n_sink is None else min(self.n_sink, start)
            with torch.no_grad():
                state["probs"][module.layer_idx] = reconstruction_probs(query.detach(), key.detach(), n_sink, start, end)
            return None

        def keep_output(module: nn.Module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            out.retain_grad()
            state["outputs"][module.layer_idx] = out

        def keep_last(module: nn.Module, args, output):
            state["last"] = output[0] if isinstance(output, tuple) else output

        handles = [m.register_forward_hook(keep_output) for m in modules]
        handles.append(decoder.layers[-1].register_forward_hook(keep_last))
        try:
            with torch.enable_grad(), _Frozen(model), attention_masks(modules, observe):
                for start, end, replay in replays:
                    state.update(start=start, end=end, probs={}, outputs={}, last=None)
                    x = torch.tensor([replay], device=first.device)
                    embeds = decoder.embed_tokens(x).detach().requires_grad_(True)
                    pos = torch.arange(n_tokens, n_tokens + len(replay), device=first.device)[None]
                    try:
                        decoder(inputs_embeds=embeds, position_ids=pos, **with_cache(cache), use_cache=True)
                        state["last"].float().square().sum().backward()
                    finally:  # the cache the harness keeps: exactly the prefill's entries again
                        for layer in cache.layers:
                            layer.keys = layer.keys[:, :, :n_tokens].detach()
                            layer.values = layer.values[:, :, :n_tokens].detach()
                    with torch.no_grad():
                        for layer, module in enumerate(modules):
                            grad = state["outputs"][layer].grad.float().norm(dim=-1)  # [B, n]
                            values = cache.layers[layer].values[:, :, start:end]
                            scores[layer][..., start:end] = attribution_scores(
                                state["probs"][layer], value_output_norms(module, values), grad, n_kv)
        finally:
            for h in handles:
                h.remove()
        for layer in cache.layers:  # drop the storage the reconstruction tokens held
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
        if self.n_sink is None and n_sys:
            for s in scores:
                s[..., :n_sys] = math.inf  # the system prompt is never evicted (KVzip's official evict range)
        return scores
