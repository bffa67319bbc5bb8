"""Conformance with NVIDIA kvpress 0.5.5: with kvpress's parameters, our methods keep what kvpress keeps,
count what kvpress counts, and generate what kvpress's pipeline generates.

Fixtures (written by ``tools/conformance/dump_kvpress.py`` in kvpress's own environment; every rule is in
``tools/conformance/KVPRESS_NOTES.md``; kvpress is not needed here):

* ``{llama,qwen3}.json``: two tiny random models (3 layers, 2 KV heads, g = 2); the positions kvpress leaves in
  the cache for 8 presses x compression ratios {0.25, 0.5, 0.75} x {query-agnostic, query-aware} on 200 / 220
  ids. One test per (family, press, ratio, mode).
* ``shapes.json``: 8 more shapes, 2 layers each -- Llama with g = 1, 3, 4, 8, Mistral (g = 2) and Mistral MQA
  (1 KV head, g = 8), Qwen2 (q/k/v biases) and Qwen2 with YaRN rope scaling -- on prefills of 90, 100, 330,
  333 and 1000 tokens (both modes) and 2500 / 5000 (query-agnostic, MQA and YaRN), every press, cr 0.1 .. 0.9
  (4 ratios per (shape, press, length, mode), in rotation). One test per (shape, press, length, mode).
* ``generations.json``: kvpress's own ``KVPressTextGenerationPipeline`` on fixed strings (a byte-level
  tokenizer saved with each model), greedy, 12 new tokens, on 4 of the shapes; compared with our
  ``harness.pipeline.run_sample`` on the same ids, token for token.

For each kept-set case we load the fixture's model (sdpa, float32), run our own prefill (``harness.pipeline.prefill``
through ``harness.attention.install``) on the case's ids -- query-agnostic: the context ids; query-aware:
context + question ids, as kvpress's ``compress_questions=True`` -- with our method in its kvpress
configuration, and take the kept indices of ``method.plan(prefill.scores, 1 - compression_ratio)``.

Press -> our method, always with ``method.preset=kvpress`` (which also sets ``budget_rule: kvpress``: kvpress's
``int(L * (1 - cr))``, not our floor, so L = 1000 at cr 0.9 keeps 99; see ``harness.compress.BudgetRule``):

    StreamingLLMPress          streaming_llm (defaults = kvpress's; the preset sets only the budget rule)
    SnapKVPress                snapkv (window 64, kernel 5, avg-pool)
    TOVAPress                  tova (defaults = kvpress's)
    KnormPress                 knorm (defaults = kvpress's)
    ObservedAttentionPress     h2o (normalised sums, no recent share)
    ExpectedAttentionPress     expected_attention (defaults = kvpress's)
    PyramidKVPress             pyramidkv (SnapKV scorer's preset; window 64 also sets the pyramid)
    AdaKVPress(SnapKVPress)    snapkv, allocator=adakv (alpha 0.2; window 64 forced in the cut)

A method whose config or scorer/allocator is not there yet is skipped with the reason.

The rule is **"identical up to ties"**: per layer and KV head, ``kept - near_ties`` must be equal on both
sides (``near_ties`` = the fixture's positions within float rounding of the cut, a superset of the exact
``ties`` that ``torch.topk`` broke in its own implementation-defined order), and the number of kept entries
must be equal wherever ``near_ties`` is empty. Where the cut is unambiguous (most cases) this is exact set
equality. Cases with ties/near-ties in the fixtures:

* SnapKV, PyramidKV, AdaKV(SnapKV) whenever the forced 64-token window is larger than the budget (cr 0.75 on
  200 / 220 tokens; cr >= 0.4 on 90 / 100 tokens, cr 0.9 on 330 / 333): kvpress keeps an arbitrary subset of the
  window and we keep another one; only counts (and, for AdaKV, nothing per head) can be compared there --
  AdaKV's per-head counts themselves depend on tie-breaking, and the check is then the per-layer total.
* Near ties (2 positions) at the cut, e.g. SnapKV and PyramidKV cr = 0.25 on llama (query-agnostic).
* Knorm: repeated token ids in layer 0 have equal or rounding-close key norms at the cut.

Models and prefills are computed once per module (a prefill serves every ratio, and every method sharing its
scorer configuration), on one thread.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "kvpress"
FAMILIES = ("llama", "qwen3")

# kvpress press -> (our method name, overrides besides preset=kvpress)
PRESS_TO_METHOD: dict[str, tuple[str, dict]] = {
    "StreamingLLMPress": ("streaming_llm", {}),
    "SnapKVPress": ("snapkv", {}),
    "TOVAPress": ("tova", {}),
    "KnormPress": ("knorm", {}),
    "ObservedAttentionPress": ("h2o", {}),
    "ExpectedAttentionPress": ("expected_attention", {}),
    "PyramidKVPress": ("pyramidkv", {}),
    "AdaKVPress(SnapKVPress)": ("snapkv", {"allocator": "adakv"}),
}
# Methods whose kvpress configuration needs the preset (the test fails if it disappears): all of them, for
# kvpress's budget rule at least.
PRESET_REQUIRED = {name for name, _ in PRESS_TO_METHOD.values()}
SHORT = {
    "StreamingLLMPress": "streaming_llm", "SnapKVPress": "snapkv", "TOVAPress": "tova", "KnormPress": "knorm",
    "ObservedAttentionPress": "observed_attention", "ExpectedAttentionPress": "expected_attention",
    "PyramidKVPress": "pyramidkv", "AdaKVPress(SnapKVPress)": "adakv_snapkv",
}


def _load_fixture(family: str) -> dict:
    with open(FIXTURES / f"{family}.json") as fh:
        return json.load(fh)


FIXTURE = {family: _load_fixture(family) for family in FAMILIES}


def _case_id(family: str, case: dict) -> str:
    mode = "aware" if case["query_aware"] else "agnostic"
    return f"{family}-{SHORT.get(case['press'], case['press'])}-cr{case['compression_ratio']}-{mode}"


CASES = [
    pytest.param(family, i, id=_case_id(family, case))
    for family in FAMILIES
    for i, case in enumerate(FIXTURE[family]["cases"])
]


def _method_config(press: str) -> dict:
    """The method config for a press (``conf/method/_common.yaml`` + ``<name>.yaml`` + kvpress overrides),
    or ``pytest.skip`` when that method (or the allocator) does not exist yet."""
    import methods
    from harness.compress import ALLOCATORS, SCORERS

    if press not in PRESS_TO_METHOD:
        pytest.skip(f"no kvbench counterpart declared for {press}")
    name, overrides = PRESS_TO_METHOD[press]
    path = ROOT / "conf" / "method" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{press}: method {name!r} not implemented yet (no conf/method/{name}.yaml)")
    methods.load_all()
    cfg = methods.config(name, **overrides)
    scorer = (cfg.get("scorer") or {}).get("name")
    if scorer not in SCORERS:
        pytest.skip(f"{press}: scorer {scorer!r} of method {name!r} is not registered (methods/{name}.py missing?)")
    allocator = (cfg.get("allocator") or {}).get("name") or "uniform"
    if allocator not in ALLOCATORS:
        pytest.skip(f"{press}: allocator {allocator!r} is not registered yet (methods/{allocator}.py missing?)")
    if "kvpress" in SCORERS[scorer].PRESETS:
        cfg["preset"] = "kvpress"
    elif name in PRESET_REQUIRED:
        pytest.fail(f"{name} has lost its kvpress preset")
    return cfg


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than several on a shared machine (no spin-waiting); restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@lru_cache(maxsize=None)
def _model(name: str):
    """A fixture model (a family of the first fixtures, or a shape of shapes.json), sdpa, float32."""
    from transformers import AutoModelForCausalLM

    model_dir = FIXTURES / "models" / name
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()


def _ids(family: str, query_aware: bool) -> list[int]:
    ids = FIXTURE[family]["meta"]["input_ids"]
    return ids["context"] + ids["question"] if query_aware else ids["context"]


_PREFILLS: dict = {}


def _scores(family: str, query_aware: bool, cfg: dict, method):
    """Our prefill's scores for a fixture family's ids."""
    return _prefill_scores(family, _ids(family, query_aware), method)


def _prefill_scores(model_name: str, ids: list[int], method):
    """Our prefill's scores, once per (model, ids, scorer and its parameters): methods that share a scorer
    configuration (snapkv, pyramidkv and snapkv+adakv under the kvpress preset) share the prefill."""
    from harness.attention import install
    from harness.pipeline import prefill

    scorer = {k: v for k, v in vars(method.scorer).items() if k != "budget_rule"}
    key = (model_name, tuple(ids), type(method.scorer).__name__, json.dumps(scorer, sort_keys=True, default=str))
    if key not in _PREFILLS:
        model = _model(model_name)
        with install(model) as hooks:
            pre = prefill(model, hooks, ids, method, seed=0)
        _PREFILLS[key] = pre.scores
    return _PREFILLS[key]


def _heads(layer_kept, n_heads: int, n_tokens: int) -> list[list[int]]:
    """Kept positions per KV head from ``plan``'s layer entry (None = whole layer kept)."""
    if layer_kept is None:
        return [list(range(n_tokens))] * n_heads
    rows = list(layer_kept) if isinstance(layer_kept, list) else list(layer_kept.unbind(0))
    return [sorted(int(i) for i in row.reshape(-1).tolist()) for row in rows]


@pytest.mark.parametrize("family,case_index", CASES)
def test_kept_sets_match_kvpress(family: str, case_index: int):
    import methods

    case = FIXTURE[family]["cases"][case_index]
    cfg = _method_config(case["press"])
    method = methods.build_method(cfg)
    n_tokens = case["k_len"]
    assert len(_ids(family, case["query_aware"])) == n_tokens
    scores = _scores(family, case["query_aware"], cfg, method)
    budgets, kept = method.plan(scores, 1 - case["compression_ratio"])

    problems = _differences(kept, case["kept"], case["near_ties"], n_tokens, case["press"].startswith("AdaKV"))
    assert not problems, (
        f"{_case_id(family, case)} ({case['press']} {case['params']}, budgets {budgets.tolist()}):\n  "
        + "\n  ".join(problems)
    )


def _differences(kept, ref_kept: list, ref_near: list, n_tokens: int, adakv: bool) -> list[str]:
    """The rule "identical up to ties": ``kept`` is ``plan``'s, ``ref_kept`` / ``ref_near`` kvpress's positions
    per layer and KV head. AdaKV: per-head counts depend on tie-breaking, the layer total must be equal."""
    problems = []
    for layer, (ref_layer, near_layer) in enumerate(zip(ref_kept, ref_near)):
        ours_layer = _heads(kept[layer], len(ref_layer), n_tokens)
        assert len(ours_layer) == len(ref_layer), f"layer {layer}: {len(ours_layer)} KV heads, kvpress {len(ref_layer)}"
        for head, (ours, ref, near) in enumerate(zip(ours_layer, ref_layer, near_layer)):
            ours_s, ref_s, near_s = set(ours), set(ref), set(near)
            extra, missing = sorted(ours_s - ref_s - near_s), sorted(ref_s - ours_s - near_s)
            if extra or missing:
                problems.append(f"layer {layer} head {head}: ours keeps {extra[:12]}{'...' if len(extra) > 12 else ''}"
                                f" ({len(extra)}) not kept by kvpress, misses {missing[:12]}"
                                f"{'...' if len(missing) > 12 else ''} ({len(missing)})")
            if not near_s and len(ours) != len(ref):
                problems.append(f"layer {layer} head {head}: keeps {len(ours)}, kvpress {len(ref)}")
        if adakv:  # the global cut: total kept per layer = H * n_kept, whatever the per-head split
            total_ours, total_ref = sum(map(len, ours_layer)), sum(map(len, ref_layer))
            if total_ours != total_ref:
                problems.append(f"layer {layer}: keeps {total_ours} in all, kvpress {total_ref}")
    return problems



# ------------------------------------------------------------------------------------------------------------
# More model shapes (shapes.json): Llama g = 1, 3, 4, 8; Mistral g = 2 and MQA; Qwen2 with and without YaRN;
# 2 layers each; prefills of 90 .. 5000 tokens; cr 0.1 .. 0.9. One test per (shape, press, length, mode), all
# its ratios checked (every method under method.preset=kvpress, i.e. kvpress's budget rule).

SHAPES = json.loads((FIXTURES / "shapes.json").read_text())


def _shape_groups() -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(SHAPES["cases"]):
        groups.setdefault((case["shape"], case["press"], case["k_len"], case["query_aware"]), []).append(i)
    return groups


SHAPE_GROUPS = _shape_groups()


def _group_id(key: tuple) -> str:
    shape, press, k_len, query_aware = key
    return f"{shape}-{SHORT.get(press, press)}-L{k_len}-{'aware' if query_aware else 'agnostic'}"


def _shape_ids(k_len: int, query_aware: bool) -> list[int]:
    stream, question = SHAPES["meta"]["input_ids"]["stream"], SHAPES["meta"]["input_ids"]["question"]
    return stream[: k_len - len(question)] + question if query_aware else stream[:k_len]


def _positions(mask: str, n_tokens: int) -> list[int]:
    """Positions set in a fixture's base64 bitmap (bit i % 8 of byte i // 8, least significant first)."""
    import base64

    if not mask:
        return []
    bits = bin(int.from_bytes(base64.b64decode(mask), "little"))[2:][::-1]
    return [i for i, b in enumerate(bits[:n_tokens]) if b == "1"]


@pytest.mark.parametrize("key", list(SHAPE_GROUPS), ids=[_group_id(k) for k in SHAPE_GROUPS])
def test_shapes_match_kvpress(key: tuple):
    import methods

    shape, press, k_len, query_aware = key
    cfg = _method_config(press)
    method = methods.build_method(cfg)
    assert method.budget_rule == "kvpress", f"{cfg['name']} under preset=kvpress counts with {method.budget_rule}"
    ids = _shape_ids(k_len, query_aware)
    scores = _prefill_scores(shape, ids, method)
    failures = []
    for i in SHAPE_GROUPS[key]:
        case = SHAPES["cases"][i]
        budgets, kept = method.plan(scores, 1 - case["compression_ratio"])
        ref, near = ([[_positions(m, k_len) for m in layer] for layer in case[key]]
                     for key in ("kept_mask", "near_ties_mask"))
        assert [[len(h) for h in layer] for layer in ref] == case["n_kept"]
        problems = _differences(kept, ref, near, k_len, press.startswith("AdaKV"))
        if problems:
            failures.append(f"cr {case['compression_ratio']} (budgets {budgets.tolist()}, kvpress {case['n_kept']}):"
                            "\n    " + "\n    ".join(problems))
    assert not failures, f"{_group_id(key)} ({press}):\n  " + "\n  ".join(failures)


def test_shapes_fixture_covers_the_grid():
    """What shapes.json holds (the counts docs/methods.md and tools/conformance/README.md quote)."""
    cases = SHAPES["cases"]
    meta = SHAPES["meta"]["shapes"]
    assert sorted({meta[c["shape"]]["g"] for c in cases}) == [1, 2, 3, 4, 8]
    assert min(meta[s]["config"]["num_key_value_heads"] for s in meta) == 1  # MQA
    assert {meta[s]["model_class"] for s in meta} == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
    assert any(meta[s]["config"]["rope_parameters"]["rope_type"] == "yarn" for s in meta)
    assert {c["compression_ratio"] for c in cases} == {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}
    assert {c["press"] for c in cases} == set(PRESS_TO_METHOD)
    assert {c["k_len"] for c in cases} == {90, 100, 330, 333, 1000, 2500, 5000}
    assert {c["query_aware"] for c in cases} == {False, True}
    assert len(cases) == 1578 and len(SHAPE_GROUPS) == 412


def test_shapes_fixture_counts_are_kvpress_arithmetic():
    """kvpress's counts in the fixture are int(L * (1 - cr)) for every uniform press, and the floor rule would
    get some of them wrong: the fixture pins the budget rule, not only the scores."""
    from harness.compress import n_keep

    uniform = [c for c in SHAPES["cases"] if c["press"] not in ("PyramidKVPress", "AdaKVPress(SnapKVPress)")]
    off_by_floor = 0
    for c in uniform:
        want = n_keep(c["k_len"], 1 - c["compression_ratio"], "kvpress")
        assert {n for layer in c["n_kept"] for n in layer} == {want}, (c["shape"], c["press"], c["k_len"])
        off_by_floor += want != n_keep(c["k_len"], 1 - c["compression_ratio"], "floor")
    assert off_by_floor == 404


# ------------------------------------------------------------------------------------------------------------
# End-to-end greedy generations (generations.json): kvpress's KVPressTextGenerationPipeline on fixed strings
# (byte-level tokenizer saved with each model) vs our harness.pipeline.run_sample on the same ids.

GENERATIONS = json.loads((FIXTURES / "generations.json").read_text())


def _gen_id(case: dict) -> str:
    press = SHORT.get(case["press"], case["press"]) if case["press"] else "full"
    return f"{case['shape']}-{press}-cr{case['compression_ratio']}-{'aware' if case['query_aware'] else 'agnostic'}"


@lru_cache(maxsize=None)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / "models" / name)


def test_generation_inputs_tokenise_alike():
    """Our transformers tokenises the fixture's strings to the ids kvpress's pipeline used."""
    texts, ids = GENERATIONS["meta"]["texts"], GENERATIONS["meta"]["input_ids"]
    for shape in GENERATIONS["meta"]["shapes"]:
        tok = _tokenizer(shape)
        assert tok.encode(tok.bos_token + texts["context"], add_special_tokens=False) == ids["agnostic_context_ids"]
        assert tok.encode(texts["question"] + "\n", add_special_tokens=False) == ids["agnostic_question_ids"]
        assert tok.encode(tok.bos_token + texts["context_aware"], add_special_tokens=False) == ids["aware_context_ids"]
        assert tok.encode("\n", add_special_tokens=False) == ids["aware_question_ids"]


@pytest.mark.parametrize("index", range(len(GENERATIONS["cases"])),
                         ids=[_gen_id(c) for c in GENERATIONS["cases"]])
def test_generation_matches_kvpress(index: int, monkeypatch):
    """Same greedy tokens as kvpress's pipeline. kvpress's query-agnostic pipeline = our query_aware=false on
    (bos + context, question + newline); its compress_questions = context + question under the press and only
    the newline after it, i.e. the same call with those ids."""
    import harness.pipeline as pipeline
    import methods
    from harness.attention import install

    case = GENERATIONS["cases"][index]
    mode = "aware" if case["query_aware"] else "agnostic"
    ids = GENERATIONS["meta"]["input_ids"]
    cfg = _method_config(case["press"]) if case["press"] else methods.config("full")
    method = methods.build_method(cfg)
    model, tokenizer = _model(case["shape"]), _tokenizer(case["shape"])
    tokens: list[list[int]] = []
    decode = pipeline.decode

    def spy(*args, **kwargs):
        gen = decode(*args, **kwargs)
        tokens.append(gen.token_ids)
        return gen

    monkeypatch.setattr(pipeline, "decode", spy)
    prefills: list = []
    prefill = pipeline.prefill
    monkeypatch.setattr(pipeline, "prefill", lambda *a, **k: prefills.append(prefill(*a, **k)) or prefills[-1])
    with install(model) as hooks:
        (outcome,) = pipeline.run_sample(model, tokenizer, hooks, method, ids[f"{mode}_context_ids"],
                                         ids[f"{mode}_question_ids"], [1 - case["compression_ratio"]], False,
                                         GENERATIONS["meta"]["max_new_tokens"], [], seed=0)
    eos = pipeline.eos_ids(model, tokenizer)
    want = list(case["generated_ids"])
    if want and want[-1] in eos:  # kvpress keeps the eos it stops on; we stop before it
        want = want[:-1]
    if tokens != [want] and method.compresses:
        tied = _tied_cuts(prefills[0].scores, outcome.budgets, method)
        if tied:  # which of the tied entries survive is torch.topk's choice, on either side: machine-dependent
            pytest.skip(f"{_gen_id(case)}: exact ties at the cut ({tied}); kept sets are compared up to ties by "
                        "test_kept_sets_match_kvpress / test_shapes_match_kvpress")
    assert tokens == [want], (f"{_gen_id(case)}: ours {tokens[0]}, kvpress {want} (kvpress's top-1 - top-2 "
                              f"logit margins {case['margins']}; budgets {outcome.budgets})")
    assert outcome.prediction == case["answer"]


def _tied_cuts(scores: list, budgets: list, method) -> list[str]:
    """(layer, head) where the budget's cut splits a group of exactly equal scores (e.g. Knorm's repeated tokens in
    layer 0, whose keys differ only by their rotation), so that two correct implementations may keep different
    entries."""
    tied = []
    for layer, (layer_scores, layer_budgets) in enumerate(zip(scores, budgets)):
        if layer_scores is None:
            continue
        protected = method.selector.protect(layer_scores[0] if layer_scores.dim() == 3 else layer_scores)
        for head, (row, budget) in enumerate(zip(protected, layer_budgets)):
            if budget >= row.numel():
                continue
            ranked = row.double().sort(descending=True).values
            if ranked[budget - 1] == ranked[budget]:
                tied.append(f"layer {layer} head {head}: {int((row.double() == ranked[budget]).sum())} tied")
    return tied


# ------------------------------------------------------------------------------------------------------------
# The arithmetic: how a ratio becomes a count (harness.compress.n_keep and the method's budget_rule)


def test_budget_rules_hand_computed():
    from harness.compress import n_keep

    # kvpress: int(L * (1 - cr)), 1 - 0.9 = 0.09999999999999998; floor: floor(L * keep + 1e-6)
    assert (n_keep(1000, 1 - 0.9, "kvpress"), n_keep(1000, 1 - 0.9, "floor")) == (99, 100)
    assert (n_keep(1000, 0.1, "kvpress"), n_keep(1000, 0.1, "floor")) == (99, 100)  # typed keep 0.1 = cr 0.9
    assert (n_keep(100, 1 - 0.8, "kvpress"), n_keep(100, 1 - 0.8, "floor")) == (19, 20)  # 100 * 0.19999999999999996
    assert (n_keep(330, 1 - 0.3, "kvpress"), n_keep(330, 1 - 0.3, "floor")) == (230, 231)  # 230.99999999999997
    assert (n_keep(333, 1 - 0.3, "kvpress"), n_keep(333, 1 - 0.3, "floor")) == (233, 233)  # 233.1
    assert (n_keep(333, 1 - 0.9, "kvpress"), n_keep(333, 1 - 0.9, "floor")) == (33, 33)
    assert (n_keep(200, 0.25, "kvpress"), n_keep(220, 0.25, "kvpress")) == (50, 55)  # the first fixtures
    assert (n_keep(100, 0.29, "kvpress"), n_keep(100, 0.29, "floor")) == (29, 29)  # 1 - 0.71 = 0.29000000000000004
    assert n_keep(5, 0.01, "kvpress") == n_keep(5, 0.01, "floor") == 1  # never an empty head
    assert n_keep(50, 1.0, "kvpress") == n_keep(50, 1.0, "floor") == 50
    with pytest.raises(ValueError):
        n_keep(10, 0.5, "round")


def test_kvpress_rule_is_kvpress_code_at_every_length():
    """n_keep(L, 1 - cr, "kvpress") is kvpress's compute_n_kept(L, cr) = max(1, int(L * (1 - cr))) for every L
    up to 5000 and cr 0.05 .. 0.95, whether the keep ratio came from a typed cr or was typed itself."""
    from harness.compress import n_keep

    ratios = [round(0.05 * i, 2) for i in range(1, 20)]
    for length in range(1, 5001):
        for cr in ratios:
            want = max(1, int(length * (1 - cr)))
            assert n_keep(length, 1 - cr, "kvpress") == want, (length, cr)
            assert n_keep(length, round(1 - cr, 2), "kvpress") == want, (length, cr)


def test_preset_kvpress_sets_the_budget_rule():
    import methods
    from harness.errors import KvbenchError

    for press in PRESS_TO_METHOD:
        cfg = _method_config(press)
        assert cfg.get("preset") == "kvpress", f"{press}: {cfg['name']} has no kvpress preset"
        method = methods.build_method(cfg)
        assert method.budget_rule == method.allocator.budget_rule == method.scorer.budget_rule == "kvpress"
        plain = methods.build_method({k: v for k, v in cfg.items() if k != "preset"})
        assert plain.budget_rule == plain.allocator.budget_rule == "floor", press
    assert methods.load("random").budget_rule == "floor"
    assert methods.load("snapkv", budget_rule="kvpress").budget_rule == "kvpress"  # also settable on its own
    with pytest.raises(KvbenchError, match="budget_rule"):
        methods.load("snapkv", budget_rule="round")
    scores = [torch.randn(1, 2, 1000) for _ in range(2)]
    for name, want in (("streaming_llm", 99), ("knorm", 99)):
        budgets, _ = methods.load(name, preset="kvpress").plan(scores, 1 - 0.9)
        assert budgets.unique().tolist() == [want]
        budgets, _ = methods.load(name).plan(scores, 1 - 0.9)
        assert budgets.unique().tolist() == [100]


def _run_values(**ratios) -> dict:
    return {"context_length": 100, "n_samples": 1, "seed": 0, "query_aware": False, "model": {"name": "tiny-random"},
            "task": {"name": "ruler/niah_single_1"}, "method": {"name": "full"}, **ratios}


def test_compression_ratio_is_keep_ratio_spelled_as_kvpress():
    from omegaconf import OmegaConf

    from harness.errors import KvbenchError
    from harness.runner import _ratio_fields, normalized
    from harness.schema import validate

    assert validate(_run_values()).keep_ratio == [0.5]  # neither: the default
    assert validate(_run_values(keep_ratio=None, compression_ratio=None)).keep_ratio == [0.5]
    s = validate(_run_values(compression_ratio=0.9))
    assert (s.keep_ratio, s.compression_ratio) == ([1 - 0.9], [0.9])  # 0.09999999999999998: kvpress's 1 - cr
    s = validate(_run_values(compression_ratio=[0.3, 0.9, 0.3, 0.0]))
    assert s.keep_ratio == [1 - 0.3, 1 - 0.9, 1.0]
    for bad, needle in ((1.0, "[0, 1)"), (-0.1, "[0, 1)"), ([], "empty"), ("a", "a finite number"),
                        (True, "a finite number"), ([0.5, 1.5], "[0, 1)")):
        with pytest.raises(KvbenchError) as err:
            validate(_run_values(compression_ratio=bad))
        assert str(err.value).startswith("compression_ratio=") and needle in str(err.value)
    for both in ({"keep_ratio": 0.5, "compression_ratio": 0.5}, {"keep_ratio": [0.1], "compression_ratio": [0.9]}):
        with pytest.raises(KvbenchError, match="exclude each other") as err:
            validate(_run_values(**both))
        assert "\n" not in str(err.value)
    # rows record both ratios, rounded for reading (the run counts with the exact value)
    assert _ratio_fields(1 - 0.9) == {"keep_ratio": 0.1, "compression_ratio": 0.9}
    assert _ratio_fields(1 - 0.3) == {"keep_ratio": 0.7, "compression_ratio": 0.3}
    assert _ratio_fields(0.25) == {"keep_ratio": 0.25, "compression_ratio": 0.75}
    # one config whichever spelling: the run dir resumes either way
    spelled = [_run_values(compression_ratio=0.9), _run_values(keep_ratio=0.1)]
    assert [normalized(OmegaConf.create(v), validate(v))["keep_ratio"] for v in spelled] == [0.1, 0.1]
    lists = [_run_values(compression_ratio=[0.9, 0.5]), _run_values(keep_ratio=[0.1, 0.5])]
    resolved = [normalized(OmegaConf.create(v), validate(v)) for v in lists]
    assert resolved[0] == resolved[1] and resolved[0]["keep_ratio"] == [0.1, 0.5] and "compression_ratio" not in resolved[0]
