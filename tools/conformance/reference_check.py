"""Independent re-implementation of kvpress 0.5.5's selection rules (as written in KVPRESS_NOTES.md),
checked against the fixtures. Needs no kvpress: run it with kvbench's own environment, from the repo root:

    .venv/bin/python tools/conformance/reference_check.py            # both families
    .venv/bin/python tools/conformance/reference_check.py llama

For each case, layer and KV head it recomputes the press's scores from the saved model's prefill (the hooked
inputs of each self_attn: post-input_layernorm hidden states and RoPE cos/sin; the post-RoPE cached keys and
values; eager attention weights for ObservedAttention), selects with torch.topk, and requires
    kept - near_ties == fixture_kept - near_ties   (and equal per-head counts where near_ties is empty).
It is an executable form of the notes, not kvbench's implementation (that is phase 2). Exit status 1 on any
mismatch.
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

FIXTURES = "tests/fixtures/kvpress"


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


@torch.no_grad()
def capture(model_dir: str, attn: str, ids: list[int]):
    """Prefill ids with no compression; per layer: self_attn inputs/outputs and the cached keys/values."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    rec = {}

    def hook(mod, args, kwargs, out):
        rec[mod.layer_idx] = {"h": kwargs["hidden_states"], "pe": kwargs["position_embeddings"], "attn": out[1]}

    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    cache = DynamicCache()
    model.model(input_ids=torch.tensor([ids]), past_key_values=cache)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(model.model.layers):
        rec[i]["k"], rec[i]["v"] = cache.layers[i].keys, cache.layers[i].values
        layer.self_attn.rotary = model.model.rotary_emb  # kvpress sets module.rotary_emb the same way
    return model, rec


def prerope_queries(mod, h):
    """q_proj (+ Qwen3 q_norm), (1, n_heads, len, head_dim), no RoPE."""
    q = mod.q_proj(h).view(1, h.shape[1], -1, mod.head_dim).transpose(1, 2)
    if hasattr(mod, "q_norm"):
        q = mod.q_norm(q)
    return q


def groups(mod, keys):
    return mod.config.num_attention_heads // keys.shape[1]


def last_queries_attention(mod, r, w):
    """softmax(q_last_w . K^T / sqrt(d)) over all keys, causal, float32; columns of the last w keys dropped."""
    keys = r["k"]
    L = keys.shape[2]
    cos, sin = r["pe"]
    q = prerope_queries(mod, r["h"][:, -w:])
    q = q * cos[:, -w:].unsqueeze(1) + rotate_half(q) * sin[:, -w:].unsqueeze(1)
    a = q @ keys.repeat_interleave(groups(mod, keys), 1).transpose(2, 3) / math.sqrt(mod.head_dim)
    a = a + torch.triu(torch.full_like(a, float("-inf")), diagonal=L - w + 1)
    return torch.softmax(a, dim=-1, dtype=torch.float32)[..., :-w]


def snapkv(mod, r, window_size=64, kernel_size=5):
    keys = r["k"]
    H, L, g = keys.shape[1], keys.shape[2], groups(mod, keys)
    s = last_queries_attention(mod, r, window_size).mean(-2)  # mean over window queries
    s = F.avg_pool1d(s, kernel_size, padding=kernel_size // 2, stride=1)  # zero padding counted
    s = s.view(1, H, g, L - window_size).mean(2)  # mean over the query heads of each KV head
    return F.pad(s, (0, window_size), value=s.max().item() + 1)  # window forced in


def tova(mod, r):
    H = r["k"].shape[1]
    s = last_queries_attention(mod, r, 1).mean(1).repeat(1, H, 1)  # mean over ALL query heads
    return F.pad(s, (0, 1), value=s.max().item() + 1)


def observed(mod, r):
    a = r["attn"]  # eager weights (1, n_heads, L, L)
    H, L = r["k"].shape[1], a.shape[-1]
    s = a.sum(2) / torch.arange(L, 0, -1, dtype=a.dtype)  # mean over the L - j queries that see key j
    return s.view(1, H, a.shape[1] // H, L).mean(2)


def streaming(r, cr, n_sink=4):
    H, L = r["k"].shape[1], r["k"].shape[2]
    s = torch.ones(1, H, L)
    n_pruned = L - int(L * (1 - cr))
    s[:, :, n_sink : n_sink + n_pruned] = 0
    return s


def knorm(r):
    return -r["k"].norm(dim=-1)


def expected_attention(mod, r, n_future_positions=512, n_sink=4):
    keys, values = r["k"][:, :, n_sink:], r["v"][:, :, n_sink:]
    H, g, d = keys.shape[1], groups(mod, keys), mod.head_dim
    h = r["h"]
    q_len = h.shape[1]
    q = prerope_queries(mod, h[:, n_sink:])
    mu = q.mean(2)
    c = q - mu[:, :, None]
    cov = c.transpose(2, 3) @ c / (q_len - n_sink)
    cos, sin = mod.rotary(mu, torch.arange(q_len, q_len + n_future_positions)[None])
    cos, sin = cos[0], sin[0]
    P = torch.zeros(d, d)
    P[d // 2 :, : d // 2] = torch.eye(d // 2)
    P[: d // 2, d // 2 :] = -torch.eye(d // 2)
    R = (cos[:, :, None] * torch.eye(d) + sin[:, :, None] * P).mean(0)
    mu, cov = mu @ R.T, R @ cov @ R.T
    kk = keys.repeat_interleave(g, 1)
    s = torch.einsum("bhd,bhnd->bhn", mu, kk) / math.sqrt(d)
    s = s + torch.einsum("bhnd,bhde,bhne->bhn", kk, cov, kk) / d / 2
    s = torch.softmax(s, dim=-1).view(1, H, g, -1).mean(2) * values.norm(dim=-1)
    return F.pad(s, (n_sink, 0), value=s.max().item() + 1)


def pyramid_budget(L, n_layers, layer_idx, cr, window_size=64, beta=20):
    max_cap = window_size + L * (1 - cr)
    min_num = (max_cap - window_size) / beta
    max_num = (max_cap - window_size) * 2 - min_num
    if max_num >= L - window_size:
        max_num = L - window_size
        min_num = (max_cap - window_size) * 2 - max_num
    if not (L >= max_num >= min_num >= window_size):
        return max(1, round(L * (1 - cr)))
    steps = (max_num - min_num) / (n_layers - 1) if n_layers > 1 else 0.0
    return round(max_num - layer_idx * steps)


def select(press, scores, L, n_layers, layer_idx, cr, alpha_safeguard=0.2):
    """Kept positions per KV head (sorted lists)."""
    H = scores.shape[0]
    n_kept = max(1, int(L * (1 - cr)))
    if press == "PyramidKVPress":
        n_kept = pyramid_budget(L, n_layers, layer_idx, cr)
    if press.startswith("AdaKVPress"):
        s = scores.clone()
        n_safe = max(1, int(n_kept * alpha_safeguard))
        s.scatter_(-1, s.topk(n_safe, dim=-1).indices, torch.finfo(s.dtype).max)
        keep = s.reshape(-1).topk(H * n_kept).indices
        return [sorted((keep[keep // L == h] % L).tolist()) for h in range(H)]
    return [sorted(scores[h].topk(n_kept).indices.tolist()) for h in range(H)]


def scores_for(press, mod, r, cr):
    if press == "StreamingLLMPress":
        return streaming(r, cr)
    if press == "TOVAPress":
        return tova(mod, r)
    if press == "KnormPress":
        return knorm(r)
    if press == "ExpectedAttentionPress":
        return expected_attention(mod, r)
    if press == "ObservedAttentionPress":
        return observed(mod, r)
    return snapkv(mod, r)  # SnapKVPress, PyramidKVPress, AdaKVPress(SnapKVPress)


def check(family: str) -> int:
    fixture = json.load(open(f"{FIXTURES}/{family}.json"))
    meta = fixture["meta"]
    ctx, question = meta["input_ids"]["context"], meta["input_ids"]["question"]
    bad = total = 0
    for aware in (False, True):
        ids = ctx + question if aware else ctx
        L = len(ids)
        captured = {a: capture(meta["model_dir"], a, ids) for a in ("sdpa", "eager")}
        for case in fixture["cases"]:
            if case["query_aware"] != aware:
                continue
            model, rec = captured[case["attn_implementation"]]
            cr, press = case["compression_ratio"], case["press"]
            n_layers = len(model.model.layers)
            for li, layer in enumerate(model.model.layers):
                with torch.no_grad():
                    scores = scores_for(press, layer.self_attn, rec[li], cr)[0]
                mine = select(press, scores, L, n_layers, li, cr)
                for h, kept in enumerate(mine):
                    total += 1
                    ref, near = set(case["kept"][li][h]), set(case["near_ties"][li][h])
                    if set(kept) - near != ref - near or (not near and len(kept) != len(ref)):
                        bad += 1
                        diff = sorted(set(kept) ^ ref)[:10]
                        print(f"MISMATCH {family} {press} cr={cr} aware={aware} layer={li} head={h} diff={diff}")
    print(f"{family}: {total} (case, layer, kv head) selections checked, {bad} mismatches")
    return bad


if __name__ == "__main__":
    families = sys.argv[1:] or ["llama", "qwen3"]
    sys.exit(1 if sum(check(f) for f in families) else 0)
