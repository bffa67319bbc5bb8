"""Training data of the KVzip surrogates (methods/kvzap.py, methods/fastkvzip.py): for each prompt, the prefill's
attention-input hidden states of every layer and KVzip's (or KVzip+'s) reconstruction scores of the same tokens,
computed by methods/kvzip.py through the harness's own prefill. The official recipes collect the same pairs on
their corpora (kvpress's kvzap/data.py: KVzip+ from one unchunked repeat forward; FastKVzip's feature.py: KVzip);
here the prompts are kvbench's generated tasks or random ids (methods/_calibration.py), nothing is downloaded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from harness.attention import attention_modules, install
from harness.compress import Method
from harness.pipeline import prefill
from methods.kvzip import GlobalAllocator, KVzipScorer


@torch.no_grad()
def collect(model: nn.Module, prompts: list[list[int]], tokenizer=None, plus: bool = False,
            n_tokens: int | None = None, seed: int = 0, chunk_size: int = 2000) -> tuple[Tensor, Tensor]:
    """``(X [N, L, hidden], y [N, L, H_kv])`` in float32: hidden states (the attention block's input, as the
    surrogates read them) and KVzip scores of ``n_tokens`` random context positions per prompt (all when None);
    the system prompt (scored +inf) is left out. ``tokenizer`` encodes the reconstruction prompt (None: the
    model's own, as the kvzip scorer finds it)."""
    scorer = KVzipScorer(chunk_size=chunk_size, kvzip_plus=plus)
    if tokenizer is not None:
        scorer.use_tokenizer(tokenizer, model)
    method = Method("kvzip", scorer, GlobalAllocator())
    modules = attention_modules(model)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    with install(model) as hooks:
        for ids in prompts:
            hidden: dict[int, Tensor] = {}

            def first(module, args, kwargs):  # the prefill's call only, not the reconstruction's
                hidden.setdefault(module.layer_idx, kwargs.get("hidden_states", args[0] if args else None))

            handles = [m.register_forward_pre_hook(first, with_kwargs=True) for m in modules]
            try:
                scores = prefill(model, hooks, list(ids), method, seed).scores
            finally:
                for h in handles:
                    h.remove()
            y = torch.stack([s[0].float().cpu() for s in scores])  # [L, H, T]
            x = torch.stack([hidden[i][0].float().cpu() for i in range(len(modules))])  # [L, T, hidden]
            usable = torch.isfinite(y).all(0).all(0) & (y > 0).all(0).all(0)
            pos = usable.nonzero().flatten()
            if n_tokens is not None and pos.numel() > n_tokens:
                pos = pos[torch.randperm(pos.numel(), generator=gen)[:n_tokens]].sort().values
            xs.append(x[:, pos].transpose(0, 1))
            ys.append(y[:, :, pos].permute(2, 0, 1))
    return torch.cat(xs), torch.cat(ys)


def split(n: int) -> tuple[Tensor, Tensor]:
    """Train / held-out indices: every 100th sample held out (FastKVzip's split_fn), at least one."""
    idx = torch.arange(n)
    test = (idx + 1) % 100 == 0
    if not bool(test.any()):
        test[-1] = True
    return idx[~test], idx[test]


def log_scores(y: Tensor) -> Tensor:
    """KVzap's regression target: log of the (positive) KVzip+ score."""
    return torch.log(y.clamp_min(torch.finfo(torch.float32).tiny))


def spearman(pred: Tensor, target: Tensor) -> float:
    """Mean rank correlation over (layer, head) columns of ``[N, L, H]`` tensors: how well the surrogate orders
    the entries (what eviction uses)."""
    def ranks(t: Tensor) -> Tensor:
        return t.argsort(0).argsort(0).float()

    p, t = ranks(pred.reshape(pred.shape[0], -1)), ranks(target.reshape(target.shape[0], -1))
    p, t = p - p.mean(0), t - t.mean(0)
    corr = (p * t).sum(0) / (p.norm(dim=0) * t.norm(dim=0)).clamp_min(1e-12)
    return float(corr.mean()) if not math.isnan(float(corr.mean())) else 0.0
