"""RULER's niah / variable-tracking prompt text is built once (tasks/ruler/templates.py) and used by the RULER
generators, the reference model's training data (harness/reference/data.py) and kvbench-train's synthetic prompts
(harness/train.py)."""
from __future__ import annotations

import random

from harness.tokenizer import byte_tokenizer
from tasks.base import PromptEncoder
from tasks.ruler import make_task
from tasks.ruler.templates import join_items, needle_sentence, niah_prompt, vt_prompt, vt_statements


def test_the_builders_write_rulers_text():
    # NVIDIA/RULER constants.py + niah.py's singular rewrite, written out by hand
    assert niah_prompt("numbers", ["sour-apple"], singular=True) == (
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n",
        "\nWhat is the special magic number for sour-apple mentioned in the provided text?",
        " The special magic number for sour-apple mentioned in the provided text is")
    head, question, prefix = niah_prompt("uuids", ["a", "b", "c"], singular=False)
    assert head.startswith("Some special magic uuids are hidden") and "quiz you about the uuids" in head
    assert question == "\nWhat are all the special magic uuids for a, b, and c mentioned in the provided text?"
    assert prefix == " The special magic uuids for a, b, and c mentioned in the provided text are"
    assert needle_sentence("numbers", "k", "123") == "One of the special magic numbers for k is: 123."
    assert join_items(["x"]) == "x" and join_items(["x", "y"]) == "x, and y"
    assert vt_statements(["AAAAA", "BBBBB", "CCCCC"], 12345) == ["VAR AAAAA = 12345", "VAR BBBBB = VAR AAAAA ",
                                                                 "VAR CCCCC = VAR BBBBB "]
    assert vt_prompt("12345", 5) == (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        "\nQuestion: Find all variables that are assigned the value 12345 in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned "
        "the value 12345, they are: ")


def test_the_generators_use_them():
    enc = PromptEncoder(byte_tokenizer())
    s = make_task("niah_single_1").sample(enc, 2048, 0, 0)
    head, question, prefix = niah_prompt("numbers", s.meta["queries"], singular=True)
    assert s.context.startswith(head) and (s.question, s.answer_prefix) == (question, prefix)
    assert needle_sentence("numbers", s.meta["queries"][0], s.answers[0]) in s.context
    s = make_task("vt").sample(enc, 2048, 0, 0)
    head, question, prefix = vt_prompt(s.meta["query"], 5)
    assert head in s.context and (s.question, s.answer_prefix) == (question, prefix)
    assert all(line in s.context for line in vt_statements(s.answers, s.meta["query"]))


def test_the_reference_data_uses_them():
    from harness.reference import data

    ex = data.niah(random.Random(3), 800, "noise", "words", "numbers", num_q=2)
    (question_prefix, target), = ex.turns
    assert ex.context.startswith(niah_prompt("numbers", ["x"], singular=False)[0])
    keys = question_prefix.split(" for ")[1].split(" mentioned")[0]
    _, question, prefix = niah_prompt("numbers", keys.split(", and "), singular=False)
    assert question_prefix == question + prefix
    values = target.strip(" .").split(", and ")
    assert len(values) == 2
    for key, value in zip(keys.split(", and "), values):  # one value per queried key, in the query's order
        assert needle_sentence("numbers", key, value) in ex.context
    ex = data.vt(random.Random(5), 1500, icl=True)
    (question_prefix, target), = ex.turns
    value = question_prefix.split("the value ")[1].split(" ")[0]
    _, question, prefix = vt_prompt(value, 5)
    assert question_prefix == question + prefix
    assert all(line in ex.context for line in vt_statements(target.split(), value))
    ex = data.dense_kv(random.Random(1), 2000)
    for q, _ in ex.turns:
        key = q.split(" for ")[1].split(" mentioned")[0]
        kind = q.split("special magic ")[1].split(" ")[0] + "s"
        assert q == "".join(niah_prompt(kind, [key], singular=True)[1:])


def test_kvbench_train_synthetic_prompts_use_them():
    from harness.train import synthetic_example

    tok = byte_tokenizer()
    for seed in range(6):
        ex = synthetic_example(tok, 500, seed)
        context = tok.decode(ex.ctx_ids, skip_special_tokens=True)
        question = tok.decode(ex.q_ids)
        answer = tok.decode(ex.target_ids)
        if ex.kind == "vt":
            value = question.split("the value ")[1].split(" ")[0]
            assert question == "".join(vt_prompt(value, 4)[1:])
            names = answer.split()
            assert all(line.rstrip() + "." in context for line in vt_statements(names, value))
        else:
            key = question.split(" for ")[1].split(" mentioned")[0]
            assert question == "".join(niah_prompt("numbers", [key], singular=True)[1:])
            assert needle_sentence("numbers", key, answer.strip()) in context


def test_reference_evaluate_reads_the_task_configs():
    """harness.reference.evaluate's own generator takes each task's haystack, needles and generation budget from
    tasks/ruler's configuration, not from a copy."""
    import pytest

    from harness.errors import KvbenchError
    from harness.reference.evaluate import own_generator

    class Recorder:
        def niah(self, rng, n, *args, **kwargs):
            return ("niah", args, kwargs)

        def vt(self, rng, n, *args, **kwargs):
            return ("vt", args, kwargs)

    build, max_new = own_generator("niah_multikey_3")
    assert max_new == 128 and build(Recorder(), None, 100) == (
        "niah", ("needle", "uuids", "uuids"), {"num_k": 1, "num_v": 1, "num_q": 1})
    build, max_new = own_generator("niah_multiquery")
    assert build(Recorder(), None, 100)[2] == {"num_k": 1, "num_v": 1, "num_q": 4}
    build, max_new = own_generator("vt")
    assert max_new == 30 and build(Recorder(), None, 100) == ("vt", (1, 4, "noise"), {"icl": True})
    with pytest.raises(KvbenchError, match="niah and vt tasks only"):
        own_generator("cwe")
