"""RULER with the reference model's own tokenizer (a BPE with split digits): under task.length_rule=kvbench every task
at 1k, 4k and 16k fills 90-100% of the context (the official rule is checked in test_ruler.py), its gold answers are in
the context, and seeds give distinct samples."""
from pathlib import Path

import pytest

import tasks
from harness.models import REFERENCE_DIR
from tasks.base import PromptEncoder

FIXTURES = Path(__file__).parent / "fixtures" / "ruler"


@pytest.fixture(scope="module")
def encoder():
    """The shipped reference tokenizer, or (before a checkpoint is shipped) the same one built as
    kvbench-train-reference builds it: deterministic, about 2 s."""
    if (REFERENCE_DIR / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return PromptEncoder(AutoTokenizer.from_pretrained(REFERENCE_DIR))
    from harness.reference.data import corpus_for_tokenizer
    from harness.reference.tokenizer import build_tokenizer

    return PromptEncoder(build_tokenizer(corpus_for_tokenizer()))


@pytest.mark.parametrize("length", [1024, 4096, 16384])
@pytest.mark.parametrize("name", tasks.expand("ruler"))
def test_length_fit_answers_and_seeds(encoder, name, length):
    data_dir = str(FIXTURES) if name.startswith("ruler/qa") else None
    task = tasks.get_task(name, data_dir=data_dir, length_rule="kvbench")  # the fill rule this file checks
    samples = task.samples(encoder, length, 2, seed=0)
    for s in samples:
        n = encoder.count(s.context, s.question + s.answer_prefix)
        assert 0.9 * length <= n <= length, (name, length, n)
        for answer in s.answers:
            assert answer.lower() in s.context.lower(), (name, answer)
    other = task.samples(encoder, length, 2, seed=1)
    assert [s.context for s in other] != [s.context for s in samples]
    assert [s.context for s in task.samples(encoder, length, 2, seed=0)] == [s.context for s in samples]
