"""longgen/recite: the number's draw, the prompt filled by hand, length fitting, the graded metric on hand-computed
cases, refusals, and one full-cache run of the reference model."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import tasks
from harness.errors import KvbenchError
from tasks.base import PromptEncoder
from tasks.longgen.metric import chunk_bounds, chunk_score, prefix_score, recite_score, recited_digits
from tasks.longgen.recite import ReciteTask, allowed_ngrams, digit_string

ROOT = Path(__file__).resolve().parent.parent
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."  # RULER's
HEAD = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about "
        "the number afterwards.\n")  # RULER's niah template in the singular (constants.py + niah.py's rewrite)


@pytest.fixture(scope="module")
def enc():
    from transformers import AutoTokenizer

    return PromptEncoder(AutoTokenizer.from_pretrained(ROOT / "harness" / "reference" / "checkpoint"))


# ------------------------------------------------------------------------------------------------ the number
@pytest.mark.parametrize("digits, unique_ngram, repeat_gap", [(256, 3, 2), (362, 3, 2), (1024, 4, 2), (64, 0, 0),
                                                                (300, 3, 1)])
def test_digit_string_keeps_its_rules(digits, unique_ngram, repeat_gap):
    for seed in range(5):
        s = digit_string(random.Random(seed), digits, unique_ngram, repeat_gap)
        assert len(s) == digits and s.isdigit()
        if unique_ngram:
            grams = [s[i:i + unique_ngram] for i in range(digits - unique_ngram + 1)]
            assert len(set(grams)) == len(grams)
        for i in range(1, digits):
            assert s[i] not in s[max(0, i - repeat_gap):i]


def test_allowed_ngrams_counts_by_hand():
    assert allowed_ngrams(3, 2) == 10 * 9 * 8 and allowed_ngrams(4, 2) == 10 * 9 * 8 * 8
    assert allowed_ngrams(3, 0) == 1000 and allowed_ngrams(2, 1) == 90


def test_samples_are_a_function_of_the_seed(enc):
    task = tasks.get_task("longgen/recite")
    a, b = task.samples(enc, 1024, 3, 0), ReciteTask().samples(enc, 1024, 3, 0)
    assert [(s.context, s.question, s.answers, s.meta) for s in a] == [(s.context, s.question, s.answers, s.meta)
                                                                       for s in b]
    other = task.samples(enc, 1024, 3, 1)
    assert len({s.answers[0] for s in a + other}) == 6  # every sample its own number
    longer = task.samples(enc, 2048, 3, 0)  # the same number and key at another length, more haystack
    assert [s.answers for s in longer] == [s.answers for s in a]
    assert all(x.meta["n_haystack"] > y.meta["n_haystack"] for x, y in zip(longer, a))


# ------------------------------------------------------------------------------------------------ the prompt
def test_prompt_is_rulers_template_filled_by_hand(enc):
    task = ReciteTask(digits=64, depth=50)
    for s in task.samples(enc, 1024, 2, 0):
        key, number, n = s.meta["key"], s.answers[0], s.meta["n_haystack"]
        lines = [NOISE] * n
        lines.insert(round(n / 2), f"One of the special magic numbers for {key} is: {number}.")
        assert s.context == HEAD + "\n".join(lines)
        assert s.question == f"\nWhat is the special magic number for {key} mentioned in the provided text?"
        assert s.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
        (b, e), = s.meta["evidence"]
        assert s.context[b:e] == number and len(number) == 64
        tokens = enc.count_sample(s)
        assert s.meta["prompt_tokens"] == tokens and 0.95 * 1024 <= tokens <= 1024  # kvbench's fill rule
        # the reference tokenizer splits digits: " " + 64 digits + "." is 66 tokens, plus the margin of 16
        assert s.max_new_tokens == s.meta["tokens_to_generate"] == 66 + 16
        assert s.meta["context_length"] == 1024 and s.meta["depth"] == round(100 * round(n / 2) / n)
    assert task.stop_strings() == [".", "\n"]


def test_essay_haystack_and_grid(enc):
    task = ReciteTask(digits=32, haystack="essay", context_lengths=[512, 1024])
    assert task.reads_data and task.lengths(4096) == [512, 1024]
    samples = task.samples(enc, 4096, 2, 0)
    assert [s.meta["context_length"] for s in samples] == [512, 512, 1024, 1024]
    for s in samples:
        needle = f"One of the special magic numbers for {s.meta['key']} is: {s.answers[0]}."
        assert s.context.startswith(HEAD) and s.context.count(needle) == 1
        assert "\n" not in s.context[len(HEAD):]  # essay sentences joined by spaces (niah.py)
        assert enc.count_sample(s) <= s.meta["context_length"]


# ------------------------------------------------------------------------------------------------ the metric
A, B, C, D = "10293847", "56473829", "01928374", "65748392"  # a 32-digit reference in four 8-digit chunks
REF = A + B + C + D
METRIC_CASES = [  # prediction, chunks score, prefix score (each worked out by hand)
    (f" {REF}.", 1.0, 1.0),                                     # perfect
    (f" {A}{B}{C[:4]}", 2 / 4, 20 / 32),                       # truncated mid-chunk
    (f" {A}{B[:3]}9{B[4:]}{C}{D}.", 3 / 4, 11 / 32),            # one digit wrong: its chunk lost
    (f" {B}{A}{C}{D}.", 3 / 4, 0.0),                            # two chunks swapped: A,C,D (or B,C,D) in order
    (f" {REF}. The special magic number is 42.", 1.0, 1.0),     # extra text after the number
    ("", 0.0, 0.0),                                             # empty
    (" I do not know.", 0.0, 0.0),                              # no digits
    (f" {A}{B}{A}{B}{C}{D}.", 1.0, 16 / 32),                    # a loop back: chunks counted once, prefix ends
    (f" {A}{C}{D}.", 3 / 4, 8 / 32),                            # a skip forward
    (f" {B}{C}{D}{A}.", 3 / 4, 0.0),                            # the longest chain, not the first match of A
    (f" {A[:4]} {A[4:]}-{B},{C} {D}", 1.0, 1.0),                # digit groups with single separators
    (f" 7{REF}", 1.0, 0.0),                                     # one extra digit in front: shifted, chunks found
    (f" 32 digits: {REF}", 0.0, 0.0),                           # the first digit run is the answer ("32")
    (f" {A}  {B}", 1 / 4, 8 / 32),                              # two spaces end the run
]


@pytest.mark.parametrize("prediction, chunks, prefix", METRIC_CASES)
def test_metric_hand_computed(prediction, chunks, prefix):
    assert recite_score(prediction, REF, "chunks", 8) == pytest.approx(chunks)
    assert recite_score(prediction, REF, "prefix") == pytest.approx(prefix)


def test_chunks_take_the_remainder_into_the_last():
    assert chunk_bounds(20, 8) == [(0, 8), (8, 20)] and chunk_bounds(16, 8) == [(0, 8), (8, 16)]
    ref = "12345678901234567890"
    assert chunk_score(ref[:16], ref, 8) == 0.5  # the last chunk is 12 digits: 4 short of it is a miss
    assert chunk_score(ref, ref, 8) == 1.0 and prefix_score(ref[:5], ref) == 0.25
    assert recited_digits("is: 12 34-56,7.8") == "1234567"
    with pytest.raises(KvbenchError, match="chunk must be 1..4"):
        chunk_bounds(4, 8)


def test_task_score_uses_its_options(enc):
    (s,) = ReciteTask(digits=32, chunk=16).samples(enc, 512, 1, 0)
    number = s.answers[0]
    wrong = "1" if number[16] == "0" else "0"
    half = f" {number[:16]}{wrong}{number[17:]}."  # the second chunk of 16 broken
    assert ReciteTask(digits=32, chunk=16).score(half, s) == 0.5
    assert ReciteTask(digits=32, chunk=16, metric="prefix").score(half, s) == 16 / 32


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("args, needle", [
    (["task.digits=8"], "task.digits=8 must be an integer within 16..4096"),
    (["task.digits=many"], "task.digits='many'"),
    (["task.chunk=0"], "task.chunk=0 must be an integer within 1..256"),
    (["task.unique_ngram=1"], "task.unique_ngram=1"),
    (["task.repeat_gap=9"], "task.repeat_gap=9"),
    (["task.digits=1024"], "task.digits=1024 needs 1022 different 3-grams"),
    (["task.haystack=lorem"], "task.haystack='lorem' is not known; allowed: noise, essay"),
    (["task.depth=150"], "task.depth=150"),
    (["task.metric=f1"], "task.metric='f1' is not known; allowed: chunks, prefix"),
    (["task.context_lengths=[1024,1024]"], "repeats a length"),
    (["+task.items=3"], "unknown parameter(s) items"),
    ([f"task.data_dir={ROOT}"], "reads no data files"),
])
def test_refused_in_process(capsys, tmp_path, args, needle):
    from conftest import refused_in_process

    line = refused_in_process(capsys, "task=longgen/recite", "model=reference", "n_samples=1", "progress=false",
                              f"hydra.run.dir={tmp_path / 'run'}", *args)
    assert needle in line, line
    assert not (tmp_path / "run").exists()


def test_unreachable_number_is_refused():
    with pytest.raises(KvbenchError, match="no 200-digit number"):
        digit_string(random.Random(0), 200, 2, 0)  # 100 different bigrams make at most 101 digits


# ------------------------------------------------------------------------------------------------ end to end
def test_reference_model_recites_with_a_full_cache(tmp_path):
    """The shipped model, full cache: a 64-digit number recited from a 512-token prompt (docs/longgen.md has the
    scores at the default 256 digits)."""
    import kvbench

    result = kvbench.run(["task=longgen/recite", "model=reference", "method=full", "n_samples=2",
                          "context_length=512", "task.digits=64", "progress=false",
                          f"hydra.run.dir={tmp_path / 'run'}"])
    (run,) = result["runs"]
    rows = [json.loads(line) for line in (Path(run["dir"]) / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    (cell,) = run["metrics"]["full"].values()
    assert cell["n"] == 2 and cell["mean"] > 0
    for r in rows:
        assert r["meta"]["evidence"] and r["evidence_retention"] == 1.0
        assert r["generated_tokens"] <= r["meta"]["tokens_to_generate"]
