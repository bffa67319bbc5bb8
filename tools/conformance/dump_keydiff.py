"""Run in kvpress's environment (tools/peers/kvpress-env.sh): kvpress 0.5.5's KeyDiffPress scores and kept
indices on seeded keys, for tests/test_conformance_keydiff.py. KeyDiff is attention-free, so the scores depend
on the keys alone and no model is needed."""
import json
from pathlib import Path

import torch
from kvpress.presses.keydiff_press import KeyDiffPress

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "kvpress" / "keydiff.json"

torch.manual_seed(0)
keys = torch.randn(1, 2, 40, 8) * torch.linspace(0.5, 2.0, 40)[None, None, :, None]  # norms vary along T
press = KeyDiffPress(compression_ratio=0.75)
scores = press.score(None, None, keys, keys.clone(), None, {})
kept = scores.topk(int(40 * (1 - 0.75)), dim=-1).indices.sort(dim=-1).values  # ScorerPress's top-k
OUT.write_text(json.dumps({"kvpress": "0.5.5", "press": "KeyDiffPress(compression_ratio=0.75)",
                           "keys": keys.tolist(), "scores": scores.tolist(), "kept": kept.tolist()}))
