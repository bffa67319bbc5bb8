"""tasks.base.LengthFittedTask: the generic base that fits a generated sample to a token length (RULER's tasks
subclass it; nothing in it is RULER's)."""
from __future__ import annotations

import pytest

from harness.tokenizer import byte_tokenizer
from tasks.base import CALIBRATION, LengthFittedTask, PromptEncoder, Sample, TooShort
from tasks.ruler.common import RulerTask


class ToyTask(LengthFittedTask):
    """``n`` lines of filler with the answer in the middle; the answer depends on the stream key only."""

    suite = "toy"
    short_name = "lines"
    max_new_tokens = 4
    n_min = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built: list[tuple] = []

    def build(self, encoder, context_length, key, n):
        self.built.append((key, n))
        answer = str(sum(map(len, map(str, key))))
        lines = ["filler line."] * n
        lines.insert(n // 2, f"The answer is {answer}.")
        return Sample(sample_id="", context="\n".join(lines), question="\nWhat is the answer?", answers=[answer],
                      answer_prefix=" Answer:", max_new_tokens=self.max_new_tokens)

    def score(self, prediction, sample):
        return float(sample.answers[0] in prediction)


@pytest.fixture(scope="module")
def enc():
    return PromptEncoder(byte_tokenizer())


def test_a_toy_task_fills_its_length(enc):
    task = ToyTask()
    assert task.name == "toy/lines" and "ruler" not in task.name
    for L in (300, 1000, 4000):
        samples = task.samples(enc, L, 3, seed=7)
        assert [s.sample_id for s in samples] == [f"toy/lines/L{L}/s7/{i}" for i in range(3)]
        for s in samples:
            t = enc.count_sample(s)
            assert 0.95 * L <= t <= L, (L, t)  # the fill rule: the prompt alone fills 95-100%
            assert s.meta["prompt_tokens"] == t and s.meta["context_length"] == L
            assert s.meta["n_haystack"] == s.context.count("filler line.")
            assert s.meta["length_rule"] == "kvbench" and s.meta["length_fallback"] is None
            assert s.meta["tokens_to_generate"] == 4 and s.meta["seed"] == 7
    # the size search measures the calibration sample, keyed by the task's own short name
    assert any(key == (CALIBRATION, "lines") for key, _ in task.built)
    # a sample is a pure function of (seed, index): regenerated alone, it is the same
    again = ToyTask().sample(enc, 1000, 7, 2)
    first = task.samples(enc, 1000, 3, seed=7)[2]
    assert (again.context, again.meta) == (first.context, first.meta)


def test_too_short_a_length_is_one_error(enc):
    with pytest.raises(TooShort, match=r"toy/lines: context_length=20 is too short"):
        ToyTask().samples(enc, 20, 1, seed=0)


def test_generated_tasks_refuse_all_samples(enc):
    with pytest.raises(Exception, match="n_samples=null"):
        ToyTask().samples(enc, 500, None, seed=0)


def test_ruler_tasks_are_length_fitted():
    assert issubclass(RulerTask, LengthFittedTask)
    from tasks.ruler import make_task

    task = make_task("niah_single_1")
    assert (task.suite, task.short_name, task.name) == ("ruler", "niah_single_1", "ruler/niah_single_1")
    assert task.sample_key(3, 4) == ("niah_single_1", 3, 4)
