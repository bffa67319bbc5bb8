"""Run in kvpress's environment from the repository root (.peers/kvpress-venv/bin/python tools/conformance/dump_think.py):
the key channels kvpress 0.5.5's ThinKPress keeps, for tests/test_conformance_think.py (think.json).

ThinK prunes key *channels*, not tokens, and kvpress zeroes them in place (the cache keeps its shape), so the
standard kept-token comparison of dump_kvpress.py does not apply. Each case prefills the tiny fixture model of a
family (tests/fixtures/kvpress/models/{llama,qwen3}, the ids of dump_kvpress.make_inputs: 200 context ids, +20
question ids query-aware) under ``ThinKPress(key_channel_compression_ratio=cr)`` (window_size 32, its default),
exactly as kvpress's pipeline prefills (``model.model(input_ids, past_key_values=DynamicCache())`` inside
``with press(model)``), and compares the cache's keys with an uncompressed prefill of the same ids: a channel of a
KV head is pruned when every one of its entries became 0 while the uncompressed ones are not all 0; the others
must be unchanged bit for bit. Recorded: ``kept[layer][kv_head]`` = sorted kept channels, and ``cut_gap`` = the
smallest kept minus the largest pruned channel score, recomputed from kvpress's formula (mean squared window query,
averaged over the group, times mean squared key) to show how far from a tie the cut is.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dump_kvpress import (FAMILIES, FIXTURE_DIR, RATIOS, SEED, _provenance, build_model, load_model,  # noqa: E402
                          make_inputs, prefill)
from kvpress.presses.think_press import ThinKPress  # noqa: E402

OUT = FIXTURE_DIR / "think.json"
COMMAND = ".peers/kvpress-venv/bin/python tools/conformance/dump_think.py"


def window_scores(model, ids, press) -> list[torch.Tensor]:
    """kvpress's channel scores per layer ``[H_kv, D]``, by its own formula on its own window queries."""
    captured = {}

    def hook(module, args, kwargs, output):
        keys = kwargs["past_key_values"].layers[module.layer_idx].keys
        queries = press.compute_window_queries(module, kwargs["hidden_states"], kwargs["position_embeddings"])
        n_kv = keys.shape[1]
        qn = queries.pow(2).mean(dim=2).view(1, n_kv, -1, module.head_dim).mean(2)
        captured[module.layer_idx] = (qn * keys.pow(2).mean(dim=2))[0]

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            prefill(model, ids)
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(model.model.layers))]


def main() -> None:
    torch.set_num_threads(1)
    ctx, q = make_inputs()
    cases = []
    for family in FAMILIES:
        model_dir = FIXTURE_DIR / "models" / family
        if not (model_dir / "config.json").exists():
            build_model(family, model_dir)
        model = load_model(model_dir, "sdpa")
        for query_aware in (False, True):
            ids = ctx + q if query_aware else ctx
            with torch.no_grad():
                full = [layer.keys.clone() for layer in prefill(model, ids).layers]
            for cr in RATIOS:
                torch.manual_seed(SEED)
                press = ThinKPress(key_channel_compression_ratio=cr)
                with torch.no_grad():
                    cache = prefill(model, ids, press)
                scores = window_scores(model, ids, press)
                kept, gaps = [], []
                for li, layer in enumerate(cache.layers):
                    keys, ref = layer.keys[0], full[li][0]
                    zero = (keys == 0).all(dim=1) & ~(ref == 0).all(dim=1)  # [H, D]
                    assert torch.equal(keys[~zero[:, None, :].expand_as(keys)], ref[~zero[:, None, :].expand_as(ref)])
                    layer_kept = [torch.nonzero(~zero[h]).flatten().tolist() for h in range(zero.shape[0])]
                    kept.append(layer_kept)
                    gaps.append([float(scores[li][h][~zero[h]].min() - scores[li][h][zero[h]].max())
                                 for h in range(zero.shape[0])])
                cases.append({"family": family, "query_aware": query_aware, "key_channel_compression_ratio": cr,
                              "window_size": press.window_size, "k_len": len(ids), "kept": kept, "cut_gap": gaps})
                print(f"think {family:6s} cr={cr:<5} aware={int(query_aware)} kept/head="
                      f"{[len(h) for l in kept for h in l]} min gap={min(min(g) for g in gaps):.3g}", file=sys.stderr)
    meta = {**_provenance(), "command": COMMAND, "families": {f: (FIXTURE_DIR / "models" / f).as_posix() for f in FAMILIES},
            "input_ids": {"context": ctx, "question": q}, "ratios": RATIOS,
            "kept": "kept[layer][kv_head] = sorted key channels ThinKPress left non-zero",
            "cut_gap": "min kept - max pruned channel score (kvpress's formula), per layer and KV head"}
    lines = ["{", '"cases":[']
    for i, c in enumerate(cases):
        lines.append(json.dumps(c, sort_keys=True, separators=(",", ":")) + ("," if i < len(cases) - 1 else ""))
    lines += ["],", '"meta":' + json.dumps(meta, sort_keys=True, indent=1), "}"]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
