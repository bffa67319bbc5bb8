"""RULER generators: length rules (official RULER's, kvbench's), gold answers in context, seeding, official
prompt structure, metrics."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.errors import KvbenchError
from harness.tokenizer import byte_tokenizer
from tasks import expand, get_task
from tasks.base import PromptEncoder
from tasks.ruler import TASK_NAMES, make_task
from tasks.ruler.common import BELOW_RANGE, BELOW_RANGE_PROMPT_ONLY, LENGTH_RULES, ruler_search, ruler_upper
from tasks.ruler.metrics import postprocess_pred, string_match_all, string_match_part
from tasks.ruler.templates import BASE, NOISE

SYNTHETIC = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]


@pytest.fixture(scope="module")
def enc():
    return PromptEncoder(byte_tokenizer())


def _check_fit(enc, s, L):
    """length_rule=ruler: prompt + generation <= L (official RULER's budget); kvbench: the prompt fills 90-100%."""
    n = enc.count(s.context, s.question + s.answer_prefix)
    assert s.meta["prompt_tokens"] == n and s.meta["tokens_to_generate"] == s.max_new_tokens
    if s.meta["length_rule"] == "kvbench":
        assert 0.9 * L <= n <= L, (s.sample_id, n, L)
        assert s.meta["length_fallback"] is None
    else:
        assert s.meta["length_rule"] == "ruler"
        assert s.meta["length_fallback"] in (None, BELOW_RANGE), (s.sample_id, s.meta["length_fallback"])
        assert n + s.max_new_tokens <= L, (s.sample_id, n, s.max_new_tokens, L)


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


@pytest.mark.parametrize("rule", LENGTH_RULES)
@pytest.mark.parametrize("name", SYNTHETIC)
def test_fit_answers_and_evidence(enc, name, rule):
    task = make_task(name, length_rule=rule)
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
    assert yaml.safe_load((root / "ruler.yaml").read_text()) == {"name": "ruler", "data_dir": None, "exclude": [],
                                                                  "length_rule": "ruler"}
    for n in TASK_NAMES:
        cfg = yaml.safe_load((root / "ruler" / f"{n}.yaml").read_text())
        assert cfg["name"] == f"ruler/{n}" and cfg["data_dir"] is None and cfg["length_rule"] == "ruler"
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
    assert s.meta["vocab_size"] == (4096 - 50) // 50  # sys_kwext: after the generation budget is taken off
    assert make_task("fwe", length_rule="kvbench").sample(enc, 4096, 0, 0).meta["vocab_size"] == 4096 // 50
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


# ------------------------------------------------------------------------------------------ length rules
def test_ruler_search_hand_computed():
    """Official RULER's binary search (niah.py generate_samples et al.) on token counts worked out by hand."""
    # count(n) = 100 + 3n, budget 1000 with 128 to generate: 100 + 3n + 128 <= 1000 <=> n <= 257.
    # Upper bound: 25 units probe 175 tokens (7 a unit): int(1000 / 7 * 3) = int(428.57) = 428.
    assert ruler_upper(175, 25, 1000, 25) == 428
    assert ruler_search(lambda n: 100 + 3 * n, 1000, 128, 25, 428) == 257
    # Not monotone: 2 tokens a unit, but 78 units overflow. Bounds [5, int(200 / 2 * 3) = 300]; RULER's probes:
    # 152 no, 78 no (the bump), 41 yes, 59, 68, 73, 75, 76, 77 yes: it settles on 77 although 79..100 fit too.
    probes = []

    def bumpy(n):
        probes.append(n)
        return 1000 if n == 78 else 2 * n

    assert ruler_upper(bumpy(5), 5, 200, 5) == 300
    probes.clear()
    assert ruler_search(bumpy, 200, 0, 5, 300) == 77
    assert probes == [152, 78, 41, 59, 68, 73, 75, 76, 77]
    assert ruler_search(lambda n: 2 * n, 200, 0, 5, 300) == 100
    # The floor: a tiny budget leaves 2 x incremental as the upper bound; nothing fits: None (RULER: incremental).
    assert ruler_upper(1000, 10, 100, 10) == 20
    assert ruler_search(lambda n: 1000 + n, 500, 0, 10, 20) is None
    # cwe's bound (sys_word_pair_random): 4096 words probe 30000 tokens: int(8192 // 7.32421875) * 2 = 1118 * 2.
    assert max(int(8192 // (30000 / 4096)) * 2, 20) == 2236


def test_ruler_step_down():
    """An overflowing sample retries with incremental fewer units while above incremental (RULER's sample loop)."""
    task = make_task("niah_single_1")
    assert task.ruler_incremental(4095) == 5 and task.ruler_incremental(4096) == 25
    assert make_task("niah_single_2").ruler_incremental(1024) == 500
    assert make_task("qa_1").ruler_incremental(1024) == 10 and make_task("cwe").ruler_incremental(8192) == 10
    assert make_task("vt").ruler_incremental(4095) == 5 and make_task("vt").ruler_incremental(4096) == 10
    assert make_task("fwe").ruler_incremental(4096) == (4096 - 50) // 32
    assert task.ruler_down(60, 25) == 35 and task.ruler_down(27, 25) == 2
    assert task.ruler_down(25, 25) is None and task.ruler_down(2, 25) is None  # RULER retries these forever


def _noise_unit():
    return len(NOISE) + 1  # one noise line and its newline: byte tokens


@pytest.mark.parametrize("L", [2048, 4096, 16384])
def test_official_size_on_a_linear_haystack(enc, L):
    """niah_single_1 with byte tokens: the prompt is count(1) + (n - 1) x 91 tokens, so RULER's choice is
    worked out by hand: the largest n with count(n) + 128 <= L; a sample whose own prompt then overflows drops
    25 lines (5 below 4096) at a time."""
    task = make_task("niah_single_1")
    count = task.calibration_count(enc, L)
    unit = _noise_unit()
    assert count(2) - count(1) == unit and count(40) - count(1) == 39 * unit
    expected = 1 + (L - 128 - count(1)) // unit
    assert task.ruler_start(enc, L) == expected
    inc = 5 if L < 4096 else 25
    for s in task.samples(enc, L, 6, seed=0):
        key = task.sample_key(0, s.meta["index"])
        own = task.count(enc, task.build(enc, L, key, 1))
        want = expected
        while own + (want - 1) * unit + 128 > L:
            want -= inc
        assert s.meta["n_haystack"] == want and s.meta["length_fallback"] is None
        _check_fit(enc, s, L)


def _official_sizes(enc, task, L, samples):
    """Every sample sits on RULER's ladder: start, start - inc, ...; the first rung that fits."""
    start, inc = task.ruler_start(enc, L), task.ruler_incremental(L)
    for s in samples:
        n = s.meta["n_haystack"]
        assert s.meta["length_fallback"] is None, (task.name, L)
        assert n <= start and (start - n) % inc == 0, (task.name, L, start, n)
        if n < start:
            key = task.sample_key(s.meta["seed"], s.meta["index"])
            assert task.count(enc, task.build(enc, L, key, n + inc)) + s.max_new_tokens > L


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_sample_on_the_official_ladder(enc, name):
    L = 8192 if name == "cwe" else 4096
    kw = {"data_dir": FIXTURES} if name.startswith("qa") else {}
    task = make_task(name, **kw)
    samples = task.samples(enc, L, 4, seed=0)
    _official_sizes(enc, task, L, samples)
    for s in samples:
        _check_fit(enc, s, L)
    if name in ("niah_single_1", "niah_single_2", "vt"):  # prompts grow with n: the search found the largest fit
        count, start = task.calibration_count(enc, L), task.ruler_start(enc, L)
        assert count(start) + task.max_new_tokens <= L < count(start + 1) + task.max_new_tokens


def test_fwe_official_linear_search(enc):
    """freq_words_extraction.py: from (L - 50) // 6 words up by (L - 50) // 32 while the prompt is shorter than
    L - 50, then one step back."""
    task = make_task("fwe")
    for L in (2048, 8192):
        budget, inc = L - 50, (L - 50) // 32
        count, start = task.calibration_count(enc, L), task.ruler_start(enc, L)
        assert (start - budget // 6) % inc == 0
        if start >= budget // 6:  # the walk went up: the next step reached the budget
            assert count(start) < budget <= count(start + inc)
        _official_sizes(enc, task, L, task.samples(enc, L, 3, seed=0))


def test_below_the_official_range(enc):
    """Where RULER's smallest size overflows (its sample loop would retry forever) the sample is fitted below it:
    prompt + generation <= L when any size allows it, else the prompt alone <= L; meta says which."""
    s = make_task("niah_single_2").sample(enc, 1024, 0, 0)  # 500 essay words are ~2.7k byte tokens
    assert s.meta["length_fallback"] == BELOW_RANGE and s.meta["n_haystack"] < 500
    _check_fit(enc, s, 1024)
    s = make_task("niah_single_1").sample(enc, 512, 0, 0)  # template + 1 line + 128 to generate > 512
    assert s.meta["length_fallback"] == BELOW_RANGE_PROMPT_ONLY and s.meta["n_haystack"] == 1
    assert enc.count(s.context, s.question + s.answer_prefix) <= 512
    with pytest.raises(KvbenchError, match="too short"):
        make_task("niah_multikey_1").sample(enc, 512, 0, 0)


def test_length_rule_parameter(enc):
    s = make_task("vt").sample(enc, 4096, 0, 0)
    assert s.meta["length_rule"] == "ruler" and s.meta["length_fallback"] is None
    s = get_task("ruler/vt", length_rule="kvbench").sample(enc, 4096, 0, 0)
    assert s.meta["length_rule"] == "kvbench"
    for bad in ("official", None, 3):
        with pytest.raises(KvbenchError, match="length_rule=.*allowed: ruler, kvbench") as err:
            get_task("ruler/niah_single_1", length_rule=bad)
        assert "\n" not in str(err.value)


# sha256 of (context, question, answer_prefix, answers, n_haystack) of 2 samples (byte tokenizer, seed 0; L=4096,
# cwe 8192, qa 2048 on the fixtures) as the kvbench rule made them before the official rule came: unchanged.
KVBENCH_RULE_SAMPLES = {
    "niah_single_1": "482ad36282ccc127", "niah_single_2": "8cd5eaeed613aac1", "niah_single_3": "444cecfea41577a0",
    "niah_multikey_1": "006587c1953ce9c0", "niah_multikey_2": "b04d9c5729c05104", "niah_multikey_3": "13e2e8cb27349d5d",
    "niah_multivalue": "0ec48f1c51d400d2", "niah_multiquery": "b0abff0fe08e07e6", "vt": "d98918d2e8e6e05a",
    "cwe": "8390e2aedfdbe7b8", "fwe": "634d3b27fe0b3f60", "qa_1": "fdfb826b095a88e8", "qa_2": "835c1ca446f74ac8",
}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_kvbench_rule_keeps_its_samples(enc, name):
    import hashlib
    import json

    L = 8192 if name == "cwe" else 2048 if name.startswith("qa") else 4096
    kw = {"data_dir": FIXTURES} if name.startswith("qa") else {}
    samples = make_task(name, length_rule="kvbench", **kw).samples(enc, L, 2, seed=0)
    blob = json.dumps([(s.context, s.question, s.answer_prefix, s.answers, s.meta["n_haystack"]) for s in samples])
    assert hashlib.sha256(blob.encode()).hexdigest()[:16] == KVBENCH_RULE_SAMPLES[name]


def _squad_file(path, n_articles=8, per_article=6):
    import json

    data = []
    for a in range(n_articles):
        paragraphs = []
        for p in range(per_article):
            code = f"{a}-{p}"
            paragraphs.append({"context": f"Paragraph {code} of article {a}: the river town keeps record {code}. "
                                          "Boats come in at dawn and leave at dusk with the market's goods.",
                               "qas": [{"question": f"Which record does paragraph {code} keep?", "is_impossible": False,
                                        "answers": [{"text": f"record {code}"}]}]})
        data.append({"title": f"A{a}", "paragraphs": paragraphs})
    (path / "dev-v2.0.json").write_text(json.dumps({"data": data}))


def _hotpot_file(path, n_questions=6):
    import json

    records = []
    for q in range(n_questions):
        context = [[f"Title {q}-{p}", [f"Sentence one of {q}-{p} is about the harbour and its many boats. ",
                                       f"Fact {q}-{p} is here, written down by the clerk of the river town."]]
                   for p in range(10)]
        records.append({"question": f"What joins {q}-3 and {q}-7?", "answer": f"fact {q}",
                        "context": context, "supporting_facts": [[f"Title {q}-3", 1], [f"Title {q}-7", 0]]})
    (path / "hotpot_dev_distractor_v1.json").write_text(json.dumps(records))


def _landing(seed, n, original):
    """Where the document at ``original`` of qa.py's list lands after random.Random(seed).shuffle."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order.index(original)


def test_qa_gold_position_is_rulers_fixed_seed_shuffle(enc, tmp_path):
    """qa.py shuffles [gold, distractors] with random.Random(random_seed): at one seed every sample with the
    same number of documents has its gold document at the same place; kvbench's rule shuffles per sample."""
    _squad_file(tmp_path)
    _hotpot_file(tmp_path)
    L = 4096
    for seed in (0, 1, 42):
        samples = make_task("qa_1", data_dir=str(tmp_path)).samples(enc, L, 6, seed=seed)
        for s in samples:
            n = s.meta["n_docs"]
            assert n < 48 and s.meta["length_fallback"] is None  # fewer than the file's 48 paragraphs
            assert s.meta["gold_doc_index"] == [_landing(seed, n, 0)]
            _check_fit(enc, s, L)
        for s in make_task("qa_2", data_dir=str(tmp_path)).samples(enc, L, 4, seed=seed):
            n = s.meta["n_docs"]
            # the question's 10 paragraphs lead qa.py's list in file order; the supporting ones are its 4th and 8th
            assert n < 60 and s.meta["gold_doc_index"] == sorted([_landing(seed, n, 3), _landing(seed, n, 7)])
            _check_fit(enc, s, L)
    again = make_task("qa_1", data_dir=str(tmp_path)).samples(enc, L, 6, seed=1)
    assert [s.meta["gold_doc_index"] for s in again] == [
        s.meta["gold_doc_index"] for s in make_task("qa_1", data_dir=str(tmp_path)).samples(enc, L, 6, seed=1)]
    free = make_task("qa_1", data_dir=str(tmp_path), length_rule="kvbench").samples(enc, L, 6, seed=0)
    assert len({s.meta["gold_doc_index"][0] for s in free}) > 1


def _word_tokenizer():
    """One token a word, Llama-like compact: a WordLevel tokenizer over RULER's cwe vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tasks.ruler.common import common_words

    vocab = {w: i for i, w in enumerate(["[UNK]", *common_words()])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", model_max_length=1 << 20)


def _cwe_shape(s):
    """(words in the solved example's list, repeats of a common word, of another word) of a cwe sample."""
    shot, task_part = s.context.split("\nBelow is a numbered list", 1)
    shot_items = re.findall(r"\d+\. (\S+)", shot.split("\nQuestion:")[0])
    items = re.findall(r"\d+\. (\S+)", task_part)
    other = next(w for w in items if w not in s.answers)
    return len(set(shot_items)), items.count(s.answers[0]), items.count(other)


def test_cwe_config_switch_at_4096(enc):
    """common_words_extraction.py: ``if args.max_seq_length < 4096`` the small example (20 words, 3x/1x) and
    6x/1x repeats, else the large one (40 words, 10x/3x) and freq_cw/freq_ucw = 30x/3x."""
    words = PromptEncoder(_word_tokenizer())
    for rule in LENGTH_RULES:
        small = make_task("cwe", length_rule=rule).sample(words, 4095, 0, 0)
        large = make_task("cwe", length_rule=rule).sample(words, 4096, 0, 0)
        assert small.meta["cwe_config"] == "small" and _cwe_shape(small) == (20, 6, 1)
        assert large.meta["cwe_config"] == "large" and _cwe_shape(large) == (40, 30, 3)
        assert "ruler_config" not in large.meta
        for s, L in ((small, 4095), (large, 4096)):
            _check_fit(words, s, L)
    # byte tokens: the large configuration's smallest prompt (~6.7k) cannot fit 4096; RULER would loop forever
    s = make_task("cwe").sample(enc, 4096, 0, 0)
    assert s.meta["cwe_config"] == "small" and "does not fit" in s.meta["ruler_config"]
    _check_fit(enc, s, 4096)
    assert make_task("cwe").sample(enc, 8192, 0, 0).meta["cwe_config"] == "large"


@pytest.fixture(scope="module")
def reference_encoder():
    from transformers import AutoTokenizer

    from harness.models import REFERENCE_DIR

    return PromptEncoder(AutoTokenizer.from_pretrained(REFERENCE_DIR))  # its tokenizer.json (a 2k-word BPE)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_reference_tokenizer_prompt_plus_generation_fits(reference_encoder, name):
    kw = {"data_dir": FIXTURES} if name.startswith("qa") else {}
    task = make_task(name, **kw)
    for L in ((2048, 8192) if name == "cwe" else (1024, 4096)):
        samples = task.samples(reference_encoder, L, 2, seed=0)
        for s in samples:
            _check_fit(reference_encoder, s, L)
            assert all(a.lower() in s.context.lower() for a in s.answers)
        if all(s.meta["length_fallback"] is None for s in samples):
            _official_sizes(reference_encoder, task, L, samples)


def test_rows_record_the_length_rule(tmp_path):
    """task.length_rule=kvbench from the command line; the row's meta (the sample's) names the rule."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "harness.cli", "model=tiny-random", "task=ruler/niah_single_1",
                        "context_length=1024", "n_samples=1", "max_new_tokens=2", "progress=false",
                        "task.length_rule=kvbench", f"hydra.run.dir={tmp_path}"], cwd=root, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(row["meta"]["length_rule"] == "kvbench" and row["meta"]["length_fallback"] is None
                        for row in rows)
