"""Near ties of the wrapper presses (CriticalKV, CriticalAdaKV, ChunkKV), for ``dump_kvpress.run_extra_case``'s
``near_ties`` hook: the positions whose side of a cut the press decided by torch.topk's tie-breaking (or within
float rounding, rtol 1e-5 as ``cut_stats``) at a cut *before* its last one, which the final scores do not show.

* CriticalKV: stage 1 (top ``int((1 - cr) * T * ratio)`` of the base scores). With SnapKV's window (64 entries
  at ``max + 1``) larger than stage 1, kvpress puts an arbitrary part of the window in stage 1.
* CriticalAdaKV: AdaKV's safeguard (top ``n_safe`` per head), the global budget cut, stage 1 and stage 2 per head,
  recomputed here on kvpress's own tensors with kvpress's code path (the recomputed kept sets are checked against
  kvpress's mask). A split tie at the global cut makes the head budgets tie-dependent: every entry of a head whose
  stage-2 rank lies between its smallest and largest possible budget is a near tie.
* ChunkKV: chunks whose score ties (or nearly) the last kept chunk's: all their tokens, every head.

Only exact kvpress quantities are used (the base scores kvpress computed, captured by ``capture``)."""
from __future__ import annotations

import math

import torch

NEAR_TIE_RTOL = 1e-5


def cut_near(scores: torch.Tensor, n_kept: int) -> set[int]:
    """Positions tied (or within 2 * rtol) with the cut of a top-``n_kept`` of a 1-D score vector."""
    n = scores.numel()
    if n_kept <= 0 or n_kept >= n:
        return set()
    s = scores.double()
    srt = torch.sort(s, descending=True).values
    last, first = float(srt[n_kept - 1]), float(srt[n_kept])
    tol = NEAR_TIE_RTOL * max(abs(last), abs(first))
    if math.isinf(last) or math.isinf(first) or last - first > 2 * tol:
        if last == first:  # +inf or the float maximum on both sides
            return set(torch.nonzero(s == last).flatten().tolist())
        return set()
    return set(torch.nonzero((s <= first + 2 * tol) & (s >= last - 2 * tol)).flatten().tolist())


def capture(press, inner):
    """Wrap ``inner.score`` (the base press of ``press``) so that every layer's base scores, values and module
    are kept on ``press._base_record`` (a clone, before the wrapper scatters into them)."""
    record: dict = {}
    orig = inner.score

    def wrapped(module, hidden_states, keys, values, attentions, kwargs):
        s = orig(module, hidden_states, keys, values, attentions, kwargs)
        record[module.layer_idx] = {"scores": s.detach().clone(), "values": values.detach().clone(), "module": module}
        return s

    inner.score = wrapped
    press._base_record = record
    return press


def _merge(near: list[list[int]], extra: list[set[int]]) -> list[list[int]]:
    return [sorted(set(n) | e) for n, e in zip(near, extra)]


def split(group: set[int], kept: list[int]) -> set[int]:
    """A tie group at a cut before the last one matters only where kvpress's final kept set splits it: a group
    kept whole (SnapKV's window when the budget holds it) left the rest of the selection as it was, whichever of
    its entries the earlier cut took (those it did not take were kept by the later cut anyway)."""
    inside = group & set(kept)
    return group if inside and inside != group else set()


def criticalkv_near_ties(press, layer: int, kept: list[list[int]], near: list[list[int]]) -> list[list[int]]:
    base = press._base_record[layer]["scores"][0]
    n_tokens = base.shape[-1]
    cr = press.compression_ratio
    n_first = int((1 - cr) * n_tokens * press.first_stage_ratio)
    if press.first_stage_ratio > 0:
        n_first = max(1, n_first) if cr < 1.0 else 0
    return _merge(near, [split(cut_near(base[h], n_first), kept[h]) for h in range(base.shape[0])])


@torch.no_grad()
def critical_adakv_near_ties(press, layer: int, kept: list[list[int]], near: list[list[int]]) -> list[list[int]]:
    from kvpress.presses.criticalkv_press import CriticalKVPress
    from kvpress.utils import compute_n_kept

    rec = press._base_record[layer]
    scores = rec["scores"].clone()  # [1, H, T], kvpress's base scores
    _, n_heads, n_tokens = scores.shape
    big = torch.finfo(scores.dtype).max
    extra = [set() for _ in range(n_heads)]
    n_kept = compute_n_kept(n_tokens, press.compression_ratio)
    n_safe = int(n_kept * press.alpha_safeguard)
    if press.alpha_safeguard > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    for h in range(n_heads):
        extra[h] |= split(cut_near(scores[0, h], n_safe), kept[h])
    top = torch.topk(scores, n_safe, dim=-1).indices
    scores.scatter_(-1, top, big)
    flat = scores.reshape(-1)
    glob = cut_near(flat, n_heads * n_kept)
    chosen = torch.topk(flat, n_heads * n_kept).indices
    budgets = torch.bincount(chosen // n_tokens, minlength=n_heads)
    # a split tie at the global cut: each head's budget may be anything between these bounds
    lo, hi = budgets.clone(), budgets.clone()
    if glob:
        band = torch.tensor(sorted(glob))
        band_heads = band // n_tokens
        for h in range(n_heads):
            mine = band[band_heads == h] % n_tokens
            extra[h] |= set(mine.tolist())
            in_band_kept = int(torch.isin(chosen[chosen // n_tokens == h], band).sum())
            lo[h] = budgets[h] - in_band_kept
            hi[h] = budgets[h] - in_band_kept + len(mine)
    first = (budgets * press.first_stage_ratio).to(torch.int64)
    for h in range(n_heads):
        extra[h] |= split(cut_near(scores[0, h], int(first[h])), kept[h])
        idx = torch.topk(scores[0, h], int(first[h])).indices
        scores[0, h, idx] = big
    second = (scores + press.epsilon) * CriticalKVPress.vwl1norm(rec["values"], rec["module"])
    for h in range(n_heads):
        s2 = second[0, h]
        extra[h] |= cut_near(s2, int(budgets[h]))
        order = torch.sort(s2.double(), descending=True, stable=True).indices
        if hi[h] > lo[h]:
            extra[h] |= set(order[int(lo[h]) : int(hi[h])].tolist())
        if not glob:  # the recomputation is kvpress's own: its kept set, outside the ties it reports
            mine = set(order[: int(budgets[h])].tolist())
            assert mine - extra[h] == set(kept[h]) - extra[h], f"layer {layer} head {h}: recomputed kept set differs"
    return _merge(near, extra)


def chunkkv_near_ties(press, layer: int, kept: list[list[int]], near: list[list[int]]) -> list[list[int]]:
    base = press._base_record[layer]["scores"]  # [1, H, T]
    n_tokens = base.shape[-1]
    length = press.chunk_length
    n_full, rest = divmod(n_tokens, length)
    if n_full == 0:  # kvpress falls back to the base press: its per-head top-k
        return _merge(near, [cut_near(base[0, h], len(kept[h])) for h in range(base.shape[1])])
    summed = base.sum(dim=1)  # as ChunkKVPress: head-summed, then the chunk means
    means = summed[..., : n_full * length].view(-1, n_full, length).mean(dim=-1)
    if rest:
        means = torch.cat([means, summed[..., -rest:].mean(dim=-1, keepdim=True)], dim=-1)
    n_chunks = n_full + (rest > 0)
    n_chunks_kept = max(1, int(n_chunks * (1 - press.compression_ratio)))
    tied = cut_near(means[0], n_chunks_kept)
    tokens = {t for c in tied for t in range(c * length, min(n_tokens, (c + 1) * length))}
    return _merge(near, [set(tokens) for _ in range(base.shape[1])])


def entropy_chunkkv_near_ties(press, layer: int, kept: list[list[int]], near: list[list[int]]) -> list[list[int]]:
    """EntropyGatedChunkKV: chunks tied (or nearly) with the chunk where kvpress's greedy pass runs out of budget
    (its order among equal chunk means is torch.argsort's)."""
    scores = press._base_record[layer]["scores"].sum(dim=1)[0].float()
    n_tokens = scores.numel()
    length = press.chunk_length
    n_full = n_tokens // length
    if n_full == 0:
        return near
    means = scores[: n_full * length].view(n_full, length).mean(dim=1)
    if n_tokens % length:
        means = torch.cat([means, scores[n_full * length :].mean().unsqueeze(0)])
    budget = max(1, int(n_tokens * (1 - press.compression_ratio)))
    touched, partial, n_partial = 0, None, 0
    for chunk in torch.argsort(means, descending=True).tolist():  # the chunks' lengths bound the count touched
        if budget <= 0:
            break
        touched += 1
        size = min(n_tokens, (chunk + 1) * length) - chunk * length
        partial, n_partial = (chunk, budget) if budget < size else (None, 0)
        budget -= min(size, budget)
    tied = cut_near(means, touched)
    inner: set[int] = set()
    if partial is not None:  # the budget ran out inside a chunk: which chunk that is may be a tie too
        before = cut_near(means, touched - 1)
        tied |= before | ({partial} if before else set())
        start = partial * length
        inner = {start + i for i in cut_near(scores[start : start + length], n_partial)}  # its top-n's own ties
    tokens = inner | {t for c in tied for t in range(c * length, min(n_tokens, (c + 1) * length))}
    return _merge(near, [set(tokens) for _ in kept])
