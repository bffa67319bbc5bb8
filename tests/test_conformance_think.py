"""Conformance of ``method=think`` (``method.preset=kvpress``) with kvpress 0.5.5's ThinKPress: the key channels
kept per (layer, KV head) are kvpress's, on the two tiny families, key-channel compression 0.25 / 0.5 / 0.75,
query-agnostic (200 context ids) and query-aware (220 ids). Fixture: tests/fixtures/kvpress/think.json, written in
kvpress's environment by tools/conformance/dump_think.py (kvpress zeroes the pruned channels in place; the dump
reads which ones became zero). kvpress's key-channel compression ratio is our ``1 - keep_ratio``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_conformance import _model, _one_thread  # noqa: F401  (_one_thread: module fixture)

FIXTURE = json.loads((Path(__file__).resolve().parent / "fixtures" / "kvpress" / "think.json").read_text())
CASES = FIXTURE["cases"]


def _case_id(case: dict) -> str:
    mode = "aware" if case["query_aware"] else "agnostic"
    return f"{case['family']}-cr{case['key_channel_compression_ratio']}-{mode}"


_CHANNELS: dict = {}


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_think_keeps_kvpress_s_key_channels(case):
    import methods
    from harness.attention import install
    from harness.pipeline import prefill

    method = methods.load("think", "preset=kvpress")
    assert (method.scorer.window, method.scorer.recent) == (case["window_size"], 0)
    ids = FIXTURE["meta"]["input_ids"]
    ids = ids["context"] + ids["question"] if case["query_aware"] else ids["context"]
    assert len(ids) == case["k_len"]
    model = _model(case["family"])
    with install(model) as hooks:
        prefill(model, hooks, ids, method, seed=0)
    cuts = method.key_channels(1 - case["key_channel_compression_ratio"])
    ours = [[row.tolist() for row in cut.channels] for cut in cuts]
    assert ours == case["kept"], f"{_case_id(case)}: gaps {case['cut_gap']}"
    assert all(cut.n_full == 0 for cut in cuts)  # kvpress prunes every prefill key


def test_the_fixture_covers_both_families_modes_and_three_ratios():
    cells = {(c["family"], c["query_aware"], c["key_channel_compression_ratio"]) for c in CASES}
    assert len(cells) == len(CASES) == 12
