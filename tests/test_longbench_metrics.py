"""LongBench metrics vs the official LongBench/metrics.py + eval.py outputs (tests/fixtures/longbench/official_scores.json,
written by make_official_scores.py from the official code), to 1e-9; aggregation rounding vs eval.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tasks.longbench import metrics as M
from tasks.longbench.aggregate import dataset_scores, e_bucket_table
from tasks.longbench.config import DATASETS, METRIC

OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "longbench" / "official_scores.json").read_text("utf-8"))


def _id(case):
    return f"{case.get('metric') or case.get('dataset')}:{case['prediction'][:20]!r}"


@pytest.mark.parametrize("case", OFFICIAL["metric_cases"], ids=_id)
def test_metric_matches_official(case):
    got = M.METRICS[case["metric"]](case["prediction"], case["ground_truth"], all_classes=case["all_classes"])
    assert 0.0 <= got <= 1.0
    assert abs(got - case["expected"]) <= 1e-9


@pytest.mark.parametrize("case", OFFICIAL["score_cases"], ids=_id)
def test_score_matches_official_eval(case):
    for name in (case["dataset"], f"longbench/{case['dataset']}"):
        got = M.score(name, case["prediction"], case["answers"], case["all_classes"])
        assert abs(got - case["expected"]) <= 1e-9


def test_cases_cover_every_metric_and_dataset():
    assert {c["metric"] for c in OFFICIAL["metric_cases"]} == set(M.METRICS)
    assert {c["dataset"] for c in OFFICIAL["score_cases"]} == set(DATASETS)
    assert set(METRIC.values()) == set(M.METRICS)


def test_first_line_rule_only_where_official():
    # trec/triviaqa/samsum/lsht: only the first non-empty-leading line counts
    assert M.score("triviaqa", "\nParis\nLondon", ["London"]) == 0.0
    assert M.score("triviaqa", "\nParis\nLondon", ["Paris"]) == 1.0
    # others: the whole prediction
    assert M.score("hotpotqa", "Paris\nLondon", ["London"]) == pytest.approx(2 / 3)


def test_classification_keeps_the_official_skip_after_remove():
    # official loop removes 'a' then skips 'ab' (list shifted), so ['ab', 'abc', ...] remain
    assert M._drop_substrings(["a", "ab", "abc"], "abc") == ["ab", "abc"]
    assert M.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5


def test_bad_inputs_are_named():
    with pytest.raises(KeyError):
        M.score("nq", "x", ["x"])
    with pytest.raises(ValueError, match="all_classes"):
        M.score("trec", "City", ["City"])
    assert M.score("qasper", "yes", "yes") == 1.0  # a bare string answer is one answer


def _rows(suite, case, lengths=None):
    rows = []
    for i, (pred, answers) in enumerate(zip(case["predictions"], case["answers"])):
        meta = {"all_classes": case["all_classes"]}
        if lengths is not None:
            meta["length"] = lengths[i]
        rows.append({"task": f"{suite}/{case['dataset']}", "score": M.score(case["dataset"], pred, answers,
                                                                            case["all_classes"]), "meta": meta})
    return rows


@pytest.mark.parametrize("case", OFFICIAL["scorer_cases"], ids=lambda c: c["dataset"])
def test_dataset_score_rounding_matches_eval_scorer(case):
    rows = _rows("longbench", case) + [{"task": f"longbench/{case['dataset']}", "score": None, "meta": {}}]
    assert dataset_scores(rows) == {case["dataset"]: case["expected"]}
    assert dataset_scores(rows, suite="longbench_e") == {}


@pytest.mark.parametrize("case", OFFICIAL["scorer_e_cases"], ids=lambda c: c["dataset"])
def test_e_buckets_match_eval_scorer_e(case):
    got = e_bucket_table(_rows("longbench_e", case, case["lengths"]))[case["dataset"]]
    for bucket, want in case["expected"].items():
        assert (math.isnan(got[bucket]) and math.isnan(want)) or got[bucket] == want, bucket
