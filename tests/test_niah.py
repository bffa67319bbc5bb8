"""task=niah: gkamradt's construction (truncation, insertion point backed up to a period, the needle's span) on
the byte tokenizer against hand-computed cases, the grid and its samples, kvpress's prompt layout, kvpress's
score equal to its own code on fixed cases, the rows of a run, and one-line refusals of bad parameters."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.errors import KvbenchError
from harness.tokenizer import byte_tokenizer
from tasks import get_task
from tasks.base import PromptEncoder
from tasks.niah import METRICS, kvpress_rouge, niah_score
from tasks.niah.task import DEPTHS, NEEDLE, QUESTION, haystack_text
from tasks.ruler.common import load_essays

FIXTURE = Path(__file__).parent / "fixtures" / "niah" / "metric_cases.json"
INSTRUCTION = " Don't give information outside the document or repeat your findings"  # gkamradt's openai.py
# 40 sentences of 11 characters, 12 with the space that joins them: sentence k starts at character 12 k
SENTENCES = [f"Line {i:02d} ok." for i in range(40)]


@pytest.fixture(scope="module")
def enc():
    return PromptEncoder(byte_tokenizer())  # one token per byte (BOS first): counts are character counts


@pytest.fixture
def essays(tmp_path):
    """gkamradt's layout: PaulGrahamEssays/*.txt (line breaks become single spaces, as RULER's loader does)."""
    (tmp_path / "PaulGrahamEssays").mkdir()
    (tmp_path / "PaulGrahamEssays" / "a.txt").write_text("\n".join(SENTENCES[:20]) + "\n")
    (tmp_path / "PaulGrahamEssays" / "b.txt").write_text("  ".join(SENTENCES[20:]) + "\n")
    return str(tmp_path)


def small_task(data_dir, **kw):
    """L = 200, buffer 100, needle "\\nNEEDLE.\\n" (9 tokens): gkamradt's haystack is 200 - 100 - 9 = 91 tokens,
    the text "Line 00 ok. ... Line 06 ok. Line 07" (cut inside sentence 7, as encode_and_trim cuts)."""
    params = dict(data_dir=data_dir, context_lengths=[200], needle="\nNEEDLE.\n", question="Where?",
                  context_wrapper="<{context}>", final_context_length_buffer=100)
    return get_task("niah", **{**params, **kw})


HAYSTACK = " ".join(SENTENCES)[:91]


# ----------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("depth, point", [
    (0, 0),     # the start
    (1, 0),     # int(91 * 0.01) = 0
    (20, 11),   # int(18.2) = 18 -> back to just after "Line 00 ok." (its period is character 10)
    (50, 35),   # int(45.5) = 45 -> back to just after "Line 02 ok." (character 34)
    (99, 83),   # int(90.09) = 90 -> back over "Line 07" and its space, to just after "Line 06 ok."
    (100, 91),  # depth 100: appended at the end, no back-up (inside the cut sentence 7)
])
def test_needle_goes_after_the_previous_period(enc, essays, depth, point):
    s = small_task(essays, depths=[depth]).samples(enc, 1024, 1, 0)[0]
    assert s.meta["haystack_tokens"] == 91 and s.meta["haystack_cut"] == 0
    assert s.meta["insertion_token"] == point
    assert s.context == "<" + HAYSTACK[:point] + "\nNEEDLE.\n" + HAYSTACK[point:] + ">"
    b, e = s.meta["evidence"][0]
    assert (b, e) == (1 + point + 1, 1 + point + 1 + 7) and s.context[b:e] == "NEEDLE."
    assert s.meta["needle_token_position"] == 1 + b  # BOS, then one token per character of the context
    assert s.meta["depth"] == depth and s.meta["context_length"] == 200
    assert s.meta["depth_effective"] == round(100 * point / 91, 2)
    assert s.meta["fallback_haystack"] is False and s.answers == ["NEEDLE."]


def test_prompt_is_kvpress_layout_with_gkamradt_question(enc, essays):
    s = small_task(essays, depths=[50], answer_prefix="Answer:").samples(enc, 1024, 1, 0)[0]
    question = "\nWhere?" + INSTRUCTION + "\n"  # own line; kvpress's "\n" question suffix without a chat template
    assert s.question == question and s.answer_prefix == "Answer:"
    assert enc.text_sample(s) == ("<Line 00 ok. Line 01 ok. Line 02 ok.\nNEEDLE.\n Line 03 ok. Line 04 ok. Line 05 ok."
                                  " Line 06 ok. Line 07>" + question + "Answer:")
    # BOS + "<" + 91 haystack + 9 needle + ">" + 76 question (1 + 6 + 68 + 1) + 7 answer prefix
    assert s.meta["prompt_tokens"] == enc.count_sample(s) == 1 + 1 + 91 + 9 + 1 + 76 + 7 == 186


def test_buffer_too_small_for_the_prompt_cuts_the_haystack_further(enc, essays):
    """buffer 0: gkamradt's haystack would be 191 tokens and the prompt 279 > 200; the haystack loses the 79."""
    s = small_task(essays, depths=[50], final_context_length_buffer=0).samples(enc, 1024, 1, 0)[0]
    assert s.meta["haystack_tokens"] == 112 and s.meta["haystack_cut"] == 79
    assert s.meta["prompt_tokens"] == enc.count_sample(s) == 200
    assert s.meta["insertion_token"] == 47  # int(112 * 0.5) = 56 -> after "Line 03 ok." (period at 46)


def test_haystack_repeats_the_essays_and_starts_of_samples(enc, essays):
    corpus = load_essays(essays)
    text = " ".join(SENTENCES)
    assert haystack_text(corpus, 0, 500) == (text + " " + text)[:500]  # wraps around after the last essay
    assert haystack_text(corpus, 24, 30) == text[24:54]
    task = small_task(essays, depths=[0, 100])
    a = task.samples(enc, 1024, 3, seed=0)
    assert [s.meta["haystack_start_char"] for s in a[:3]] == [s.meta["haystack_start_char"] for s in a[3:]]
    assert a[0].meta["haystack_start_char"] == 0  # sample 0 of a cell: gkamradt's haystack
    assert all(s.meta["haystack_start_char"] % 12 == 0 for s in a)  # at a sentence start
    again = small_task(essays, depths=[0, 100]).samples(enc, 1024, 3, seed=0)
    assert [s.context for s in again] == [s.context for s in a]
    other = [small_task(essays, depths=[0], context_lengths=[200]).samples(enc, 1024, 6, seed=s) for s in (0, 1)]
    assert [x.meta["haystack_start_char"] for x in other[0]] != [x.meta["haystack_start_char"] for x in other[1]]
    s = small_task(essays, depths=[0]).samples(enc, 1024, 2, 0)[1]
    start = s.meta["haystack_start_char"]
    assert s.context == "<\nNEEDLE.\n" + (text + " " + text)[start:start + 91] + ">"


def test_grid_and_defaults(enc):
    assert list(DEPTHS) == np.round(np.linspace(0, 100, num=35, endpoint=True)).astype(int).tolist()  # gkamradt
    task = get_task("niah", context_lengths=[512, 768], depths=[10, 90])
    samples = task.samples(enc, 4096, 2, 0)
    cells = [(s.meta["context_length"], s.meta["depth"]) for s in samples]
    assert cells == [(512, 10)] * 2 + [(512, 90)] * 2 + [(768, 10)] * 2 + [(768, 90)] * 2
    assert task.cells(4096) == [(512, 10), (512, 90), (768, 10), (768, 90)]
    assert len({s.sample_id for s in samples}) == 8 and samples[0].sample_id == "niah/L512/d10/s0/0"
    for s in samples:
        assert s.meta["fallback_haystack"] is True  # no data_dir: the shipped prose
        assert enc.count_sample(s) <= s.meta["context_length"]
        assert s.meta["haystack_tokens"] + s.meta["needle_tokens"] == s.meta["context_length"] - 200
        b, e = s.meta["evidence"][0]
        assert s.context[b:e] == NEEDLE.strip() and s.answers == [NEEDLE.strip()]
        ids, _ = enc.encode_sample(s)
        pos = s.meta["needle_token_position"]
        assert byte_tokenizer().decode(ids[pos:pos + 4]) == "The "
    default = get_task("niah")
    assert default.depths == list(DEPTHS) and default.question == QUESTION
    assert [s.meta["context_length"] for s in default.samples(enc, 300, 1, 0)] == [300] * 35  # the run's length


def test_too_short_length_is_one_error(enc):
    with pytest.raises(KvbenchError, match="context length 250 is too short"):
        get_task("niah", context_lengths=[250], depths=[50]).samples(enc, 1024, 1, 0)  # 200 + 99 needle bytes


# ----------------------------------------------------------------------------------------- kvpress's score
def test_metric_equals_kvpress_on_fixed_cases():
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["source"]["repo"] == "NVIDIA/kvpress" and len(fixture["source"]["commit"]) == 40
    cases = fixture["cases"]
    assert len(cases) >= 10 and sum(c["error"] is None for c in cases) >= 10
    for case in cases:
        ours = kvpress_rouge(case["needle"], case["prediction"])
        if case["error"] is not None:  # kvpress's calculate_metrics raises there; the row scores 0.0
            assert ours is None and all(niah_score(case["needle"], case["prediction"], m) == 0.0 for m in METRICS)
            continue
        assert ours == case["expected"], case["prediction"]
        for metric in METRICS:
            name, stat = metric.split("/")
            assert niah_score(case["needle"], case["prediction"], metric) == case["expected"][name][stat]


def test_task_score_is_the_chosen_number(enc):
    fixture = json.loads(FIXTURE.read_text())
    case = next(c for c in fixture["cases"] if c["prediction"].startswith(" eat a sandwich"))
    for metric in ("rouge-l/f", "rouge-1/p", "rouge-2/r"):
        task = get_task("niah", context_lengths=[400], depths=[50], metric=metric)
        sample = task.samples(enc, 400, 1, 0)[0]
        name, stat = metric.split("/")
        assert task.score(case["prediction"], sample) == case["expected"][name][stat]
    assert task.score("", sample) == 0.0


# ----------------------------------------------------------------------------------------- bad parameters
@pytest.mark.parametrize("params, needle", [
    ({"depths": [120]}, "task.depths has 120"), ({"depths": [-1]}, "within 0..100"), ({"depths": []}, "non-empty"),
    ({"depths": [True]}, "task.depths has True"), ({"depths": [50, 50]}, "repeats"),
    ({"context_lengths": [0]}, "task.context_lengths has 0"), ({"context_lengths": 1024}, "list"),
    ({"context_lengths": [1024.5]}, "positive integer"), ({"needle": " "}, "task.needle"),
    ({"question": None}, "task.question"), ({"max_new_tokens": 0}, "task.max_new_tokens=0"),
    ({"final_context_length_buffer": -1}, "final_context_length_buffer=-1"),
    ({"context_wrapper": "no slot"}, "{context}"), ({"metric": "rouge-3/f"}, "allowed: rouge-1/f"),
    ({"depth": 50}, "unknown parameter(s) depth; allowed: data_dir, context_lengths, depths"),
])
def test_bad_params_are_one_line_errors(params, needle):
    with pytest.raises(KvbenchError) as err:
        get_task("niah", **params)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args, needle", [
    (["task.depths=[0,120]"], "task.depths has 120"),
    (["task.context_lengths=[0]"], "task.context_lengths has 0"),
    (["+task.depth=50"], "unknown parameter(s) depth"),
    (["task.context_lengths=[70000]", "task.depths=[50]"], "larger than the model's maximum (65536 positions)"),
])
def test_refused_in_process(capsys, tmp_path, args, needle):
    from conftest import refused_in_process

    line = refused_in_process(capsys, "task=niah", "model=tiny-random", "n_samples=1", "progress=false",
                              f"hydra.run.dir={tmp_path / 'run'}", *args)
    assert needle in line


# ----------------------------------------------------------------------------------------- rows of a run
def test_rows_carry_their_cell(tmp_path):
    """One run, two lengths x two depths: each row's context_length is its cell's, its prompt within it."""
    from harness.overrides import Composer
    from harness.runner import run

    with Composer(Path(__file__).resolve().parent.parent / "conf", "config") as composer:
        cfg = composer.compose(["task=niah", "task.context_lengths=[300,400]", "task.depths=[0,100]",
                                "model=tiny-random", "n_samples=1", "max_new_tokens=2", "progress=false"])
    run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["context_length"], r["meta"]["depth"]) for r in rows] == [(300, 0), (300, 100), (400, 0), (400, 100)]
    for r in rows:
        assert r["error"] is None and 0.0 <= r["score"] <= 1.0
        assert r["context_tokens"] < r["context_length"] and r["meta"]["prompt_tokens"] <= r["context_length"]
