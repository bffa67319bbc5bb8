"""Run in kvpress's environment (.peers/kvpress-venv/bin/python tools/conformance/dump_cam.py): kvpress 0.5.5's
merging presses on seeded tensors, for tests/test_conformance_cam.py: CAMPress's bulk merge-and-prune (cam.json)
and MergingPress's similarity merge (merging.json).

CAMPress is a decoding press (it compresses every ``compression_interval`` decoding steps), so the standard
prefill-under-press comparison does not apply; its merge is called directly, as its forward hook would call it:
``compress(module, hidden, keys, values, attentions)`` with ``attentions`` = the cumulative attention of seeded
queries (causal softmax column sums, averaged over each KV head's query heads: what kvbench's ``cam`` scorer
accumulates over a prefill), KnormPress as the base press (attention-free), and ``layer_step_counts`` at least the
number of evicted tokens, so that every evicted token is a merge candidate, as in kvbench's one compression after the
prefill. The Bernoulli draws: ``torch.bernoulli(p)`` is replaced by ``u < p`` with ``u`` the uniforms kvbench's scorer
draws from the layer generator (``torch.rand([1, H, T], generator=Generator().manual_seed(seed))``), the same draw
in both implementations.
"""
import json
from pathlib import Path

import torch
from torch import nn

from kvpress.presses.cam_press import CAMPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.merging_press import MergingPress

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "kvpress" / "cam.json"
OUT_MERGING = OUT.with_name("merging.json")
N_TOKENS, N_KV, DIM = 48, 2, 8


def cumulative_attention(queries, keys, group):
    logits = torch.einsum("bhqd,bhkd->bhqk", queries, keys.repeat_interleave(group, dim=1)) * DIM ** -0.5
    causal = torch.ones(N_TOKENS, N_TOKENS, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1).sum(dim=2)  # [B, H_q, T]
    return probs.reshape(1, N_KV, group, N_TOKENS).mean(dim=2)


def dyadic(x):
    """Multiples of 1/64: exact in float32, stored as the integers ``64 x`` (the fixture stays small)."""
    return (x * 64).round() / 64


def sixty_fourths(x):
    return (x * 64).round().long().tolist()


def rounded(x):
    return [round(v, 6) for v in x.flatten().tolist()]  # the test's tolerance is 1e-5


def case(seed, compression_ratio, merge_budget, group):
    torch.manual_seed(seed)
    queries = dyadic(torch.randn(1, N_KV * group, N_TOKENS, DIM))
    keys = dyadic(torch.randn(1, N_KV, N_TOKENS, DIM) * torch.linspace(0.5, 2.0, N_TOKENS)[None, None, :, None])
    values = dyadic(torch.randn(1, N_KV, N_TOKENS, DIM))
    attentions = cumulative_attention(queries, keys, group)
    uniform = torch.rand(1, N_KV, N_TOKENS, generator=torch.Generator().manual_seed(seed))
    target = int(N_TOKENS * (1 - compression_ratio))
    press = CAMPress(base_press=KnormPress(), target_size=target, merge_budget=merge_budget)
    module = nn.Module()
    module.layer_idx = 0
    press.layer_step_counts[0] = N_TOKENS  # >= evicted tokens: all of them are merge candidates
    press._running_attn_sum[0] = attentions.clone()
    mean_scores = press.base_press.score(module, None, keys, values, None, {}).mean(dim=1)
    merged_at = mean_scores.topk(N_TOKENS - target, dim=-1, largest=False).indices.sort(dim=-1).values

    def bernoulli(prob):
        assert prob.shape == (1, N_KV, N_TOKENS - target)
        return (uniform[..., merged_at[0]] < prob).to(prob.dtype)

    real = torch.bernoulli
    torch.bernoulli = bernoulli
    try:
        out_keys, out_values = press.compress(module, None, keys.clone(), values.clone(), attentions, {})
    finally:
        torch.bernoulli = real
    kept = mean_scores.topk(target, dim=-1).indices.sort(dim=-1).values
    # keys are never merged: CAMPress returns the kept keys as they were
    assert torch.equal(out_keys, keys.gather(2, kept[:, None, :, None].expand(-1, N_KV, -1, DIM)))
    return {"seed": seed, "compression_ratio": compression_ratio, "merge_budget": merge_budget, "group": group,
            "queries_64": sixty_fourths(queries), "keys_64": sixty_fourths(keys), "values_64": sixty_fourths(values),
            "attentions": rounded(attentions), "kept": kept.tolist(),
            "merged_values": rounded(out_values)}


cases = [case(seed, cr, m, g) for seed, (cr, m, g) in enumerate(
    [(cr, m, g) for cr in (0.25, 0.5, 0.75) for m in (4, 32) for g in (1, 2)])]
OUT.write_text(json.dumps({"kvpress": "0.5.5", "press": "CAMPress(base_press=KnormPress(), target_size, merge_budget)",
                           "cases": cases}))
print(f"wrote {len(cases)} cases to {OUT}")


def merging_case(seed, compression_ratio, threshold, fraction):
    """MergingPress(KnormPress) on seeded keys / values: its compress, as ScorerPress's, prunes to the top-k of the
    inner press's scores after folding the evicted values in. Keys are drawn with a few near-duplicates so that
    similarities spread over [-1, 1]."""
    torch.manual_seed(seed)
    keys = torch.randn(1, N_KV, N_TOKENS, DIM)
    keys[:, :, 1::3] = keys[:, :, 0::3][:, :, : keys[:, :, 1::3].shape[2]] + 0.3 * torch.randn_like(keys[:, :, 1::3])
    keys = dyadic(keys * torch.linspace(0.5, 2.0, N_TOKENS)[None, None, :, None])
    values = dyadic(torch.randn(1, N_KV, N_TOKENS, DIM))
    press = MergingPress(press=KnormPress(compression_ratio=compression_ratio), similarity_threshold=threshold,
                         merge_fraction=fraction)
    module = nn.Module()
    module.head_dim = DIM
    out_keys, out_values = press.compress(module, None, keys.clone(), values.clone(), None, {})
    scores = press.press.score(module, None, keys, values, None, {})
    kept = scores.topk(int(N_TOKENS * (1 - compression_ratio)), dim=-1).indices
    order = kept.sort(dim=-1)
    # kvpress's output is in top-k order; sorted by position here, as kvbench's kept indices are
    out_values = out_values.gather(2, order.indices[..., None].expand(-1, -1, -1, DIM))
    assert torch.equal(out_keys.gather(2, order.indices[..., None].expand(-1, -1, -1, DIM)),
                       keys.gather(2, order.values[..., None].expand(-1, -1, -1, DIM)))
    return {"seed": seed, "compression_ratio": compression_ratio, "similarity_threshold": threshold,
            "merge_fraction": fraction, "keys_64": sixty_fourths(keys), "values_64": sixty_fourths(values),
            "kept": order.values.tolist(), "merged_values": rounded(out_values)}


merging = [merging_case(seed, cr, t, f) for seed, (cr, t, f) in enumerate(
    [(cr, t, f) for cr in (0.25, 0.5, 0.75) for t, f in ((0.0, 1.0), (0.3, 1.0), (0.0, 0.75), (0.2, 0.5))])]
OUT_MERGING.write_text(json.dumps({"kvpress": "0.5.5",
                                   "press": "MergingPress(press=KnormPress(compression_ratio), similarity_threshold, "
                                            "merge_fraction)", "cases": merging}))
print(f"wrote {len(merging)} cases to {OUT_MERGING}")
