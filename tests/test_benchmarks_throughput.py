"""benchmarks/ragged_decode.py, batching.py, gpu_figures.py and refresh_readme.py's block, at tiny sizes.

What each measures (the caches it compares, the rows it checks, the memory it reports, the lines it writes), never
how fast: speed targets live in the benchmarks, not in timed unit tests.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    import batching
    import gpu_figures
    import ragged_decode
    import refresh_readme
    import speed

    model, tok = speed.load("reference")
    return dict(batching=batching, gpu_figures=gpu_figures, ragged=ragged_decode, readme=refresh_readme,
                speed=speed, model=model, tok=tok)


@pytest.fixture(scope="module")
def ragged(bench):
    return bench["ragged"].measure(bench["model"], bench["tok"], context=256, budget=32, splits=[[24, 40], [4, 60]],
                                   steps=2, repeats=1)


@pytest.fixture(scope="module")
def batched(bench):
    return bench["batching"].measure(bench["model"], bench["tok"], context=256, n_samples=3, max_new_tokens=4,
                                     repeats=1, batch_size=2,
                                     methods={"snapkv keep 0.25": ["method=snapkv", "keep_ratio=0.25"]})


def test_ragged_and_uniform_caches_hold_the_same_total(ragged, bench):
    n_layers = bench["model"].config.num_hidden_layers
    assert ragged["per_head_counts_layer0"] == {"full": [ragged["prompt_tokens"]] * 2, "uniform": [32, 32],
                                                "ragged 24,40": [24, 40], "ragged 4,60": [4, 60]}
    assert ragged["total_entries"]["uniform"] == ragged["total_entries"]["ragged 24,40"] == \
        ragged["total_entries"]["ragged 4,60"] == 64 * n_layers
    assert set(ragged["ratios"]) == {"ragged 24,40 / uniform", "ragged 4,60 / uniform", "uniform / full"}
    assert all(r > 0 for r in ragged["ratios"].values())


def test_splits_scale_and_must_tile_the_heads(bench):
    r = bench["ragged"]
    assert r.scaled_splits(8192) == [[6400, 9984], [2048, 14336]]  # 200/312 and 64/448 of 256, times 32
    assert r.head_counts([200, 312], 8, 256) == [200, 312] * 4
    with pytest.raises(ValueError, match="average the budget"):
        r.head_counts([200, 300], 2, 256)
    with pytest.raises(ValueError, match="tile 3 KV heads"):
        r.head_counts([200, 312], 3, 256)


def test_batching_runs_the_runner_at_both_sizes_with_the_same_answers(batched):
    row = batched["methods"]["snapkv keep 0.25"]
    assert row["same_predictions_and_scores"] is True and row["rows"] == 3
    assert set(row["samples_per_s"]) == {"batch 1", "batch 2"}
    assert row["ratio_range"][0] <= row["ratio"] <= row["ratio_range"][1]


def test_readme_block_has_the_new_ratios(bench, ragged, batched):
    # the speed rows are speed.py's (not under test here): its result's keys, filled with placeholders
    pairs = ["sweep_5_ratios / single_ratio", "separate_5 / sweep_5_ratios", "harness_full / bare_generate"]
    speed = {"machine": ragged["machine"], "date": ragged["date"], "model": "reference", "context_tokens": 256,
             "new_tokens": 2, "repeats": 1, "ratios": {p: 1.0 for p in pairs}}
    block = bench["readme"].render(speed, None, "not run", ragged, batched)
    lines = block.splitlines()
    r = ragged["ratios"]["ragged 4,60 / uniform"]
    assert f"| ragged / uniform decode step, same total (KV heads 4/60 vs 32 each) | {r:.2f}x" in block
    b = batched["methods"]["snapkv keep 0.25"]["ratio"]
    assert f"| batch 2 / batch 1 samples per second (snapkv keep 0.25) | {b:.2f}x" in block
    assert "predictions and scores identical at both batch sizes" in lines[-2]
    assert lines[0] == bench["readme"].START and lines[-1] == bench["readme"].END
    # without the new measurements the block is the speed table alone
    assert "ragged" not in bench["readme"].render(speed, None, "not run")


def test_peak_memory_reports_the_kept_cache_per_method(bench):
    out = bench["gpu_figures"].peak_memory(bench["model"], bench["tok"], 256, ["full", "snapkv", "streaming_llm"],
                                           keep=0.25, new_tokens=2)
    full = out["methods"]["full"]["kv_mib"]
    for name in ("snapkv", "streaming_llm"):
        assert out["methods"][name]["keep_ratio"] == 0.25
        assert out["methods"][name]["kv_mib"] == pytest.approx(full / 4, rel=0.05)
