"""Conformance with kvpress 0.5.5 for the presses beyond the first eight: kept entries identical up to ties.

Fixtures ``tests/fixtures/kvpress/extra/<group>.json``, one per group of presses in
``tools/conformance/presses/<group>.py``, written in kvpress's environment by
``tools/conformance/dump_kvpress.py --extra <group>`` on the two tiny families of ``llama.json`` / ``qwen3.json``
(their saved models and input ids: 200 context ids query-agnostic, 220 with the question query-aware),
compression ratios 0.25 / 0.5 / 0.75. Each case names the kvbench method (and overrides) that stands for the
press; we run it with ``method.preset=kvpress`` where its scorer has that preset, through our own prefill
(``harness.pipeline.prefill``), and compare ``method.plan``'s kept indices with the rule of
``tests/test_conformance.py`` (per layer and KV head, equal outside the near ties at the cut; a press that masks
instead of pruning, ``global_cut``, also has its per-layer total compared). One test per fixture case.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_conformance import _differences, _model, _one_thread  # noqa: F401  (_one_thread: module fixture)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kvpress"
GROUPS = {p.stem: json.loads(p.read_text()) for p in sorted((FIXTURES / "extra").glob("*.json"))}


def _case_id(group: str, case: dict) -> str:
    mode = "aware" if case["query_aware"] else "agnostic"
    return f"{group}-{case['family']}-{case['press']}-cr{case['compression_ratio']}-{mode}"


CASES = [pytest.param(group, i, id=_case_id(group, case))
         for group, data in GROUPS.items() for i, case in enumerate(data["cases"])]


def _method(case: dict):
    import methods
    from harness.compress import SCORERS

    if case["method"] not in methods.config_names():
        pytest.fail(f"{case['press']}: the fixture names method {case['method']!r}, which has no config")
    methods.load_all()
    cfg = methods.config(case["method"], **case["overrides"])
    scorer = (cfg.get("scorer") or {}).get("name")
    if scorer in SCORERS and "kvpress" in SCORERS[scorer].PRESETS:
        cfg["preset"] = "kvpress"
    return methods.build_method(cfg)


_PREFILLS: dict = {}


def _scores(group: str, case: dict, method, keep_ratio: float):
    """Our prefill's scores, once per (family, mode, method config) when the scorer shares a prefill across
    ratios, else once per ratio (the scorer's prefill depends on it)."""
    from harness.attention import install
    from harness.pipeline import prefill

    ids = GROUPS[group]["meta"]["input_ids"]
    n_question = len(ids["question"]) if case["query_aware"] else 0  # what a query-aware run tells the scorer
    ids = ids["context"] + ids["question"] if case["query_aware"] else ids["context"]
    assert len(ids) == case["k_len"]
    shared = method.shares_across_ratios
    key = (case["family"], case["query_aware"], json.dumps(method.config, sort_keys=True, default=str),
           None if shared else keep_ratio)
    if key not in _PREFILLS:
        model = _model(case["family"])
        with install(model) as hooks:
            pre = prefill(model, hooks, ids, method, seed=0, keep_ratio=1.0 if shared else keep_ratio,
                          n_question=n_question)
        # the method that prefilled plans too: a scorer may keep per-layer auxiliaries of its prefill for its
        # budget-dependent step (Scorer.rerank: CriticalKV's value norms)
        _PREFILLS[key] = (pre.scores, method)
    return _PREFILLS[key]


def _ids(group: str, case: dict) -> list[int]:
    ids = GROUPS[group]["meta"]["input_ids"]
    return ids["context"] + ids["question"] if case["query_aware"] else ids["context"]


def _chunked_kept(case: dict, method, keep_ratio: float) -> list[list[list[int]]]:
    """Prompt positions each layer and head keeps after our chunked prefill (``method.prefill_chunk``)."""
    from harness.attention import install
    from harness.pipeline import chunked_prefill

    group = next(g for g, data in GROUPS.items() if case in data["cases"])
    model = _model(case["family"])
    with install(model) as hooks:
        done = chunked_prefill(model, hooks, _ids(group, case), method, 0, keep_ratio)
    return [layer.sort(dim=-1).values for layer in done.kept]


@pytest.mark.parametrize("group,index", CASES)
def test_extra_kept_sets_match_kvpress(group: str, index: int):
    case = GROUPS[group]["cases"][index]
    method = _method(case)
    keep_ratio = 1 - case["compression_ratio"]
    if method.prefill_chunk is not None:
        kept = _chunked_kept(case, method, keep_ratio)
        budgets = torch.tensor([[len(h) for h in layer] for layer in kept])
    else:
        scores, method = _scores(group, case, method, keep_ratio)
        budgets, kept = method.plan(scores, keep_ratio)
    layers = case.get("compare_layers", range(len(case["kept"])))
    pick = lambda per_layer: [per_layer[i] for i in layers]  # noqa: E731
    problems = _differences(pick(kept), pick(case["kept"]), pick(case["near_ties"]), case["k_len"],
                            case["global_cut"])
    assert not problems, (f"{_case_id(group, case)} ({case['press']} {case['params']}, budgets "
                          f"{budgets.tolist()}):\n  " + "\n  ".join(problems))


def test_every_group_file_has_its_fixture():
    """A press group defined for the dump has its fixture, and every fixture covers both families, both modes
    and three ratios for each of its presses (the grid the issue asks for)."""
    groups = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "tools" / "conformance" / "presses")
                    .glob("*.py") if not p.stem.startswith("_"))
    assert groups == sorted(GROUPS)
    for group, data in GROUPS.items():
        grid: dict[str, set] = {}
        for case in data["cases"]:
            grid.setdefault(case["press"], set()).add((case["family"], case["query_aware"], case["compression_ratio"]))
        for press, cells in grid.items():
            assert {c[0] for c in cells} == {"llama", "qwen3"} and {c[1] for c in cells} == {False, True}, press
            assert len({c[2] for c in cells}) >= 3 and len(cells) == 4 * len({c[2] for c in cells}), press


REROTATED = [pytest.param(group, i, id=_case_id(group, case)) for group, data in GROUPS.items()
             for i, case in enumerate(data["cases"]) if "key_channels" in case]


@pytest.mark.parametrize("group,index", REROTATED)
def test_rerotated_keys_match_kvpress(group: str, index: int):
    """``method.rerotate_keys``: channels 0 and d/2 (the fastest and the slowest rotating pair) of every cached
    key equal kvpress's KeyRerotationPress, row for row in cache order."""
    from harness.cache import prune, rerotate
    from harness.pipeline import kept_positions

    case = GROUPS[group]["cases"][index]
    method = _method(case)
    assert method.rerotate_keys
    keep_ratio = 1 - case["compression_ratio"]
    scores, method = _scores(group, case, method, keep_ratio)
    _, kept = method.plan(scores, keep_ratio)
    from harness.attention import install
    from harness.pipeline import prefill

    model = _model(case["family"])
    with install(model) as hooks:
        full = prefill(model, hooks, _ids(group, case), method, seed=0)
        cache = prune(full.cache, kept)
        n = rerotate(cache, kept_positions(kept, None, full.cache), hooks.rotary.inv_freq)
    assert n == len(case["key_channels"][0][0])
    for layer, (ours, ref) in enumerate(zip(cache.layers, case["key_channels"])):
        half = ours.keys.shape[-1] // 2
        got = ours.keys[0][:, :, [0, half]]
        assert torch.allclose(got, torch.tensor(ref), atol=2e-4, rtol=1e-4), f"layer {layer}"
