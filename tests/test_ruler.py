"""RULER generators: length fit, gold answers in context, seeding, official prompt structure, metrics."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.errors import KvbenchError
from harness.tokenizer import byte_tokenizer
from tasks import expand, get_task
from tasks.base import PromptEncoder
from tasks.ruler import TASK_NAMES, make_task
from tasks.ruler.metrics import postprocess_pred, string_match_all, string_match_part
from tasks.ruler.templates import BASE, NOISE

SYNTHETIC = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]


@pytest.fixture(scope="module")
def enc():
    return PromptEncoder(byte_tokenizer())


def _check_fit(enc, s, L):
    n = enc.count(s.context, s.question + s.answer_prefix)
    assert 0.9 * L <= n <= L, (s.sample_id, n, L)
    assert s.meta["prompt_tokens"] == n


def _check_evidence(s):
    ev = s.meta["evidence"]
    assert ev, s.sample_id
    for b, e in ev:
        assert 0 <= b < e <= len(s.context)


def _lengths(name):
    if name == "cwe":  # ~12 byte tokens per list entry: smallest prompts ~1.7k bytes (<4096), ~6.5k (>=4096)
        return [2048, 8192, 16384]
    if name in ("niah_single_1", "niah_multikey_1", "vt"):
        return [1024, 4096, 16384]
    return [1024, 4096]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_fit_answers_and_evidence(enc, name):
    task = make_task(name)
    for L in _lengths(name):
        samples = task.samples(enc, L, 2, seed=0)
        assert len(samples) == 2
        for s in samples:
            _check_fit(enc, s, L)
            _check_evidence(s)
            assert s.max_new_tokens == BASE[_base_of(name)]["tokens_to_generate"]
            ctx = s.context
            for a in s.answers:
                assert a in ctx, (name, a)
            if name.startswith("niah") or name == "vt":
                # every gold answer is exactly covered by evidence (niah: the values; vt: the statements)
                covered = " ".join(ctx[b:e] for b, e in s.meta["evidence"])
                for a in s.answers:
                    assert a in covered


def _base_of(name):
    return {"vt": "variable_tracking", "cwe": "common_words_extraction", "fwe": "freq_words_extraction"}.get(
        name, "qa" if name.startswith("qa") else "niah")


@pytest.mark.parametrize("name", SYNTHETIC)
def test_seeding(enc, name):
    task = make_task(name)
    L = 8192 if name == "cwe" else 4096
    a = task.samples(enc, L, 2, seed=3)
    b = make_task(name).samples(enc, L, 2, seed=3)  # fresh instance: no shared cache
    c = task.samples(enc, L, 2, seed=4)
    assert [(s.context, s.question, s.answers) for s in a] == [(s.context, s.question, s.answers) for s in b]
    assert [s.context for s in a] != [s.context for s in c]
    assert a[0].context != a[1].context
    # a sample alone equals the same sample inside a batch (pure function of seed and index)
    assert task.sample(enc, L, 3, 1).context == a[1].context
    # training seeds are a separate stream
    big = task.sample(enc, L, 1_000_003, 0)
    assert big.context != a[0].context


def test_16k_is_fast(enc):
    import time

    t0 = time.time()
    for name in ("niah_single_2", "niah_multikey_2", "vt"):
        for s in make_task(name).samples(enc, 16384, 2, seed=0):
            _check_fit(enc, s, 16384)
    assert time.time() - t0 < 10


# ------------------------------------------------------------------------------------------ prompt structure
def _in_order(text, pieces):
    pos = 0
    for p in pieces:
        i = text.find(p, pos)
        assert i >= 0, (p, text[pos:pos + 200])
        pos = i + len(p)


def test_niah_single_1_structure(enc):
    s = make_task("niah_single_1").sample(enc, 1024, 0, 0)
    full = s.context + s.question + s.answer_prefix
    key = s.meta["queries"][0]
    assert s.context.startswith("A special magic number is hidden within the following text. Make sure to memorize "
                                "it. I will quiz you about the number afterwards.\n")
    assert s.question == f"\nWhat is the special magic number for {key} mentioned in the provided text?"
    assert s.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert f"One of the special magic numbers for {key} is: {s.answers[0]}." in s.context
    assert NOISE in s.context
    body = s.context.split("afterwards.\n", 1)[1]
    lines = body.split("\n")
    assert all(line == NOISE or line.startswith("One of the special magic numbers for") for line in lines)
    assert re.fullmatch(r"\d{7}", s.answers[0])
    assert full.count("\n") == len(lines) + 1
    assert s.meta["haystack"] == "noise" and 0 <= s.meta["depth"] <= 100


def test_niah_plural_and_uuid_structure(enc):
    s = make_task("niah_multiquery").sample(enc, 4096, 0, 0)
    q = s.meta["queries"]
    assert len(q) == 4 and len(s.answers) == 4
    query = f"{q[0]}, {q[1]}, {q[2]}, and {q[3]}"
    _in_order(s.context + s.question + s.answer_prefix, [
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the numbers afterwards.\n",
        f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?",
        f" The special magic numbers for {query} mentioned in the provided text are"])
    assert s.meta["fallback_haystack"] is True and s.meta["haystack"] == "essay"
    u = make_task("niah_multikey_3").sample(enc, 4096, 0, 0)
    uuid_re = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid_re, u.answers[0]) and re.fullmatch(uuid_re, u.meta["queries"][0])
    assert u.question.startswith("\nWhat is the special magic uuid for ")
    lines = u.context.split("afterwards.\n", 1)[1].split("\n")
    assert len(lines) > 10 and all(re.fullmatch(rf"One of the special magic uuids for {uuid_re} is: {uuid_re}\.", x)
                                   for x in lines)


def test_niah_fixed_depth(enc):
    for depth in (0, 50, 100):
        for name in ("niah_single_1", "niah_single_2", "niah_multikey_2"):
            s = make_task(name, depth=depth).sample(enc, 4096, 0, 0)
            assert s.meta["depth"] == depth
            b, e = s.meta["evidence"][0]
            rel = b / len(s.context) * 100
            assert abs(rel - depth) < 8, (name, depth, rel)
    with pytest.raises(KvbenchError):
        make_task("niah_single_1", depth=120)
    with pytest.raises(KvbenchError):
        make_task("vt", depth=50)


def test_niah_default_depths_spread(enc):
    depths = [s.meta["depth"] for s in make_task("niah_single_2").samples(enc, 1024, 12, seed=0)]
    assert len(set(depths)) > 4


def test_vt_structure(enc):
    s = make_task("vt").sample(enc, 4096, 0, 0)
    full = s.context + s.question + s.answer_prefix
    value = s.meta["query"]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    prefix = (" Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned "
              "the value {v}, they are: ")
    assert full.startswith(head)
    assert full.count(head) == 2  # the solved example, then the task
    example, task_part = full.split(head)[1:]
    assert re.search(r" they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n\n$", example)
    assert s.question == f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    assert s.answer_prefix == prefix.format(v=value)
    v = s.answers
    assert len(v) == 5 and all(re.fullmatch(r"[A-Z]{5}", x) for x in v)
    chain = [f"VAR {v[0]} = {value}"] + [f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(4)]
    _in_order(task_part, chain)
    assert [s.context[b:e] for b, e in s.meta["evidence"]] == [c.strip() for c in chain]


# ------------------------------------------------------------------------------------------ registry, configs
def test_registry_and_configs():
    from pathlib import Path

    import yaml

    names = expand("ruler")
    assert names == [f"ruler/{n}" for n in TASK_NAMES] and len(names) == 13
    root = Path(__file__).resolve().parents[1] / "conf" / "task"
    assert yaml.safe_load((root / "ruler.yaml").read_text()) == {"name": "ruler", "data_dir": None, "exclude": []}
    for n in TASK_NAMES:
        cfg = yaml.safe_load((root / "ruler" / f"{n}.yaml").read_text())
        assert cfg["name"] == f"ruler/{n}" and cfg["data_dir"] is None
        if n.startswith("niah"):
            assert cfg["depth"] is None
        params = {k: v for k, v in cfg.items() if k != "name"}
        task = get_task(cfg["name"], **params)
        assert task.name == cfg["name"] and task.info["suite"] == "ruler"
    with pytest.raises(KvbenchError):
        get_task("ruler/vt", bogus=1)


# ------------------------------------------------------------------------------------------ metrics
def test_string_match_all():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("only 123 here", ["123", "456"]) == 0.5
    assert string_match_all("nothing", ["123", "456", "789", "000"]) == 0.0
    assert string_match_all("ABC-def and XyZ", ["abc-DEF", "xyz", "q"]) == pytest.approx(2 / 3)
    assert string_match_all("1234567", ["123"]) == 1.0  # containment, as RULER


def test_string_match_part():
    assert string_match_part("Paris, France", ["paris", "Lyon"]) == 1.0
    assert string_match_part("LYON", ["Paris", "lyon"]) == 1.0
    assert string_match_part("Marseille", ["Paris", "Lyon"]) == 0.0


def test_postprocess_and_score(enc):
    assert postprocess_pred("  a\tb\x00c \n") == "a\nb\nc"
    task = make_task("niah_multivalue")
    s = task.sample(enc, 1024, 0, 0)
    assert task.score(" " + " ".join(s.answers), s) == 1.0
    assert task.score(", ".join(s.answers[:2]).upper(), s) == 0.5
    assert task.score("", s) == 0.0
    assert task.stop_strings() == []


def test_cwe_too_short_is_one_line_error(enc):
    with pytest.raises(KvbenchError, match="too short") as err:
        make_task("cwe").samples(enc, 1024, 1, 0)
    assert "\n" not in str(err.value)


def test_cwe_structure(enc):
    for L, shot_n, reps in ((2048, 20, (6, 1)), (8192, 40, (30, 3))):
        s = make_task("cwe").sample(enc, L, 0, 0)
        head = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
        q = "\nQuestion: What are the 10 most common words in the above list?"
        prefix = " Answer: The top 10 words that appear most often in the list are:"
        assert s.question == q and s.answer_prefix == prefix
        shot, task_part = (s.context + s.question + s.answer_prefix).split("\n" + head)
        assert shot.startswith(head) and (q + prefix + " 1. ") in shot
        assert re.search(r"are: 1\. \S.* 10\. \S+$", shot)
        items = re.findall(r"(\d+)\. (\S+)", task_part.split(q)[0])
        assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
        counts = {}
        for _, w in items:
            counts[w] = counts.get(w, 0) + 1
        assert all(counts[a] == reps[0] for a in s.answers) and len(s.answers) == 10
        assert all(c == reps[1] for w, c in counts.items() if w not in s.answers)
        assert len(s.meta["evidence"]) == 10 * reps[0]
        assert all(s.context[b:e] in s.answers for b, e in s.meta["evidence"])


def test_fwe_structure(enc):
    s = make_task("fwe").sample(enc, 4096, 0, 0)
    assert s.context.startswith("Read the following coded text and track the frequency of each coded word. Find the "
                                "three most frequently appeared coded words. ")
    assert s.question == ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
                          "three most frequently appeared words in the above coded text?")
    assert s.answer_prefix == " Answer: According to the coded text above, the three most frequently appeared words are:"
    words = s.context.split("coded words. ", 1)[1].split(" ")
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts, key=counts.get, reverse=True)
    assert ranked[0] == "..." and ranked[1:4] == s.answers
    assert s.meta["vocab_size"] == 4096 // 50
    assert sorted(s.context[b:e] for b, e in s.meta["evidence"]) == sorted(w for w in words if w in s.answers)


# ------------------------------------------------------------------------------------------ QA
FIXTURES = str(Path(__file__).parent / "fixtures" / "ruler")


@pytest.mark.parametrize("name,label,file", [("qa_1", "SQuAD", "dev-v2.0.json"),
                                             ("qa_2", "HotpotQA", "hotpot_dev_distractor_v1.json")])
def test_qa_needs_data(enc, name, label, file, tmp_path):
    for data_dir in (None, str(tmp_path)):
        with pytest.raises(KvbenchError) as err:
            make_task(name, data_dir=data_dir).samples(enc, 1024, 1, 0)
        msg = str(err.value)
        assert "\n" not in msg and f"ruler/{name} needs {label}" in msg and file in msg and "task.data_dir" in msg


@pytest.mark.parametrize("name", ["qa_1", "qa_2"])
def test_qa_fixture(enc, name):
    task = make_task(name, data_dir=FIXTURES)
    n_questions = 10 if name == "qa_1" else 3  # answerable questions in the fixture
    for L in (1024, 4096):
        samples = task.samples(enc, L, 50, seed=0)
        assert len(samples) == n_questions
        for s in samples:
            _check_fit(enc, s, L)
            _check_evidence(s)
            assert s.max_new_tokens == 32
            assert s.context.startswith("Answer the question based on the given documents. Only give me the answer "
                                        "and do not output any other words.\n\nThe following are given documents."
                                        "\n\nDocument 1:\n")
            assert s.question.startswith("\n\nAnswer the question based on the given documents. Only give me the "
                                         "answer and do not output any other words.\n\nQuestion: ")
            assert s.answer_prefix == " Answer:"
            docs = s.context.split("\n\nDocument ")[1:]
            assert [int(d.split(":", 1)[0]) for d in docs] == list(range(1, len(docs) + 1))
            assert len(docs) == s.meta["n_docs"]
            for b, e in s.meta["gold_doc_spans"]:
                assert any(b <= eb and ee <= e for eb, ee in s.meta["evidence"])
            if name == "qa_1":
                assert any(s.context[b:e].lower() == s.answers[0].lower() for b, e in s.meta["evidence"])
        assert {s.question for s in samples} == {s.question for s in task.samples(enc, L, 50, seed=1)}
    a = [s.context for s in task.samples(enc, 2048, 3, seed=0)]
    b = [s.context for s in task.samples(enc, 2048, 3, seed=5)]
    assert a == [s.context for s in make_task(name, data_dir=FIXTURES).samples(enc, 2048, 3, seed=0)]
    assert a != b
    s = task.sample(enc, 2048, 0, 0)
    assert task.score(f"The answer is {s.answers[0].upper()}.", s) == 1.0
    assert task.score("no idea", s) == 0.0


# ------------------------------------------------------------------------------------------ essays
def _essay_text():
    return " ".join(f"Essay sentence number {i} talks about towns and rivers. Another point follows here!"
                    for i in range(400))


@pytest.mark.parametrize("layout", ["json", "folder"])
def test_essays_from_data_dir(enc, tmp_path, layout):
    import json

    text = _essay_text()
    if layout == "json":
        (tmp_path / "PaulGrahamEssays.json").write_text(json.dumps({"text": text}))
    else:
        (tmp_path / "PaulGrahamEssays").mkdir()
        (tmp_path / "PaulGrahamEssays" / "a.txt").write_text(text[:5000])
        (tmp_path / "PaulGrahamEssays" / "b.txt").write_text(text[5000:])
    s = make_task("niah_single_2", data_dir=str(tmp_path)).sample(enc, 4096, 0, 0)
    _check_fit(enc, s, 4096)
    assert s.meta["fallback_haystack"] is False
    assert "Essay sentence number 0 talks about towns and rivers." in s.context
    # the needle sits between whole sentences
    b, e = s.meta["needle_spans"][0]
    assert s.context[b - 2] in ".!\n" and s.context[e] == " "
    # longer than the corpus: RULER repeats it
    long = make_task("niah_single_2", data_dir=str(tmp_path)).sample(enc, 65536, 0, 0)
    assert long.context.count("Essay sentence number 0 talks") >= 2


def test_fit_with_a_bpe_tokenizer():
    """Merges make token counts non-additive: the fit must still hold (a BPE trained here, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tasks.ruler.common import DATA

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([(DATA / "fallback_essays.txt").read_text()[:60000]], trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", model_max_length=1 << 20)
    enc = PromptEncoder(tok)
    for name in ("niah_single_2", "niah_multikey_3", "vt", "fwe", "qa_1"):
        kw = {"data_dir": FIXTURES} if name == "qa_1" else {}
        for s in make_task(name, **kw).samples(enc, 4096, 3, seed=0):
            _check_fit(enc, s, 4096)


def test_suite_exclude_leaves_out_named_tasks_and_refuses_unknown_ones():
    from omegaconf import OmegaConf

    from harness.runner import suite_tasks

    names = suite_tasks(OmegaConf.create({"name": "ruler", "exclude": ["qa_1", "ruler/qa_2"]}))
    assert len(names) == 11 and "ruler/qa_1" not in names and "ruler/qa_2" not in names and "ruler/vt" in names
    assert suite_tasks(OmegaConf.create({"name": "ruler/vt", "exclude": []})) == ["ruler/vt"]
    with pytest.raises(KvbenchError, match="task.exclude='qa_3' is not a task of ruler; allowed: niah_single_1"):
        suite_tasks(OmegaConf.create({"name": "ruler", "exclude": ["qa_3"]}))
