"""InfiniteBench tasks: registry and configs, metrics vs the official compute_scores.py, prompts vs the official
templates (by hand and by the official create_prompt's hashes), the official middle truncation, the generated
passkey / number_string / kv_retrieval, one-line errors, one tiny run of the whole suite on the fixture files."""
from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest

from harness.errors import KvbenchError
from harness.tokenizer import byte_tokenizer
from tasks import expand, get_task
from tasks.base import PromptEncoder
from tasks.infinitebench import make_task, metrics as M
from tasks.infinitebench.config import (ANSWER_PREFIX, DATA_URL, MAX_NEW_TOKENS, METRIC, PROMPT_FAMILIES, SYNTHETIC,
                                        TASKS, TEMPLATES)
from tasks.infinitebench.prompt import keep_middle_cut, truncate
from tasks.infinitebench.synthetic import NOISE

FIX = Path(__file__).parent / "fixtures" / "infinitebench"
CONF = Path(__file__).parent.parent / "conf" / "task"
OFFICIAL = json.loads((FIX / "metric_cases.json").read_text("utf-8"))
FILE_TASKS = [t for t in TASKS if t not in SYNTHETIC]


@pytest.fixture(scope="module")
def enc():
    return PromptEncoder(byte_tokenizer())


def _records(task):
    return [json.loads(line) for line in (FIX / f"{task}.jsonl").read_text("utf-8").splitlines() if line.strip()]


def _samples(enc, task, context_length=1 << 16, n=None, **kw):
    return make_task(f"infinitebench/{task}", data_dir=str(FIX), **kw).samples(enc, context_length, n, 0)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_configs_and_defaults():
    import yaml

    assert expand("infinitebench") == [f"infinitebench/{t}" for t in TASKS] and len(TASKS) == 12
    for t in TASKS:
        task = get_task(f"infinitebench/{t}")
        assert task.name == f"infinitebench/{t}" and task.info["suite"] == "infinitebench"
        assert task.prompt_family == "yarn_mistral" and task.reads_data
        cfg = yaml.safe_load((CONF / "infinitebench" / f"{t}.yaml").read_text())
        want = {"name": f"infinitebench/{t}", "data_dir": None, "prompt_family": "yarn_mistral"}
        assert cfg == ({**want, "depth": None} if t in SYNTHETIC else want)
    assert sorted(p.stem for p in (CONF / "infinitebench").glob("*.yaml")) == sorted(TASKS)
    suite = yaml.safe_load((CONF / "infinitebench.yaml").read_text())
    assert suite == {"name": "infinitebench", "data_dir": None, "exclude": [], "prompt_family": "yarn_mistral"}


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("case", OFFICIAL["metric_cases"], ids=lambda c: f"{c['task']}:{c['prediction'][:16]!r}")
def test_metric_equals_official_compute_scores(case):
    task = case["task"]
    got = M.METRICS[METRIC[task]](case["prediction"], case["label"])
    via_sample = M.score(task, case["prediction"], M.answers_of(task, case["label"]))  # as rows are scored
    assert 0.0 <= got <= 1.0
    assert abs(got - case["expected"]) <= 1e-9 and abs(via_sample - case["expected"]) <= 1e-9


def test_every_task_and_metric_has_ten_official_cases():
    assert OFFICIAL["source"]["commit"] == "88b3daa6989da2fbe0077170d7a3c84c25d5ae58"
    per_task = {t: sum(c["task"] == t for c in OFFICIAL["metric_cases"]) for t in TASKS}
    assert min(per_task.values()) >= 10, per_task
    per_metric = {m: sum(METRIC[c["task"]] == m for c in OFFICIAL["metric_cases"]) for m in M.METRICS}
    assert min(per_metric.values()) >= 10 and set(per_metric) == set(METRIC.values())
    for task in TASKS:  # the cases are not all one value
        assert len({c["expected"] for c in OFFICIAL["metric_cases"] if c["task"] == task}) > 1, task


def test_deviations_where_the_official_code_fails_on_hub_labels():
    uuid = "5e6b7b90-710d-4953-9b18-3e96b2cadbf2"
    assert M.kv_retrieval_score(f"It is {uuid}.", [uuid]) == 1.0  # official: a list label never matches
    assert M.math_find_score("88.0", 88) == 0.0  # official: int("88.0") raises ValueError
    assert M.score("math_find", "55", ["55.0"]) == 1.0 and M.score("math_find", "55", ["55.5"]) == 0.0
    assert M.score("code_run", "The value is 4", ["4"]) == 1.0  # a label read as a string is still an int
    assert M.label_of("math_calc", M.answers_of("math_calc", [[1, 2]])) == [1, 2]


# ------------------------------------------------------------------------------------------------ prompts
def test_records_labels_and_prompts_equal_official_create_prompt(enc):
    """Every fixture record, every family: the label is get_answer's and the joined parts hash to create_prompt's."""
    by_task = {t: _records(t) for t in TASKS}
    for case in OFFICIAL["record_cases"]:
        task, record = case["task"], by_task[case["task"]][case["index"]]
        for family, official in case["prompts"].items():
            if family == "gpt4" and task == "math_calc":
                with pytest.raises(KvbenchError, match="prompt_family=gpt4 has no math_calc prompt"):
                    make_task(f"infinitebench/{task}", data_dir=str(FIX), prompt_family=family)
                continue
            s = _samples(enc, task, prompt_family=family)[case["index"]]
            assert M.label_of(task, s.answers) == M.label_of(task, M.answers_of(task, case["label"]))
            text = s.context + s.question + s.answer_prefix
            if "error" in official:  # claude2's longbook_qa_eng names {input}, which create_prompt does not pass
                assert (family, task, official["error"]) == ("claude2", "longbook_qa_eng", "KeyError: 'input'")
                assert text == TEMPLATES[family][task].format(context=record["context"], input=record["input"])
                continue
            assert hashlib.sha256(text.encode()).hexdigest() == official["sha256"], (task, family)
            assert not s.meta["truncated"] and s.meta["split"] == "none"


def test_prompts_filled_by_hand(enc):
    """yarn_mistral's templates (src/prompt.py) written out here; the context part ends with the document."""
    r = _records("passkey")[0]
    s = _samples(enc, "passkey")[0]
    assert s.context == ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                         "I will quiz you about the important information.\n\n" + r["context"])
    assert s.question == "\n\nWhat is the pass key?\n\n" and s.answer_prefix == "The pass key is"

    r = _records("kv_retrieval")[1]
    s = _samples(enc, "kv_retrieval")[1]
    assert s.context + s.question + s.answer_prefix == (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n" + r["context"]
        + "\n\n" + r["input"])
    assert s.question == "\n\n" + r["input"] and s.answer_prefix == ""

    r = _records("longbook_choice_eng")[0]
    s = _samples(enc, "longbook_choice_eng")[0]
    o = r["options"]
    assert s.context + s.question + s.answer_prefix == (
        f"Read the book and answer the question.\n\n{r['context']}\n\nQuestion: {r['input']}\nA. {o[0]}\nB. {o[1]}\n"
        f"C. {o[2]}\nD. {o[3]}\n\nThe letter of the correct answer is")
    assert s.answers == [r["answer"][0], "B"]

    r = _records("code_debug")[0]
    s = _samples(enc, "code_debug")[0]
    o = r["options"]
    assert s.context == ("Following is a Python code where exactly one of the functions/methods has a deliberate "
                         "error that makes it crash.\n\n" + r["context"])
    assert s.question + s.answer_prefix == (f"\n\nOptions:\nA. {o[0]}\nB. {o[1]}\nC. {o[2]}\nD. {o[3]}\n\n"
                                            "The correct option is:")
    assert s.answers == ["count_lines", "C"]

    r = _records("math_find")[1]  # create_prompt: "The smallest number of" -> "the smallest number" (-3 chars)
    s = _samples(enc, "math_find")[1]
    assert s.context == f"What is the smallest number in the following list?\n\n{r['context']}"
    assert s.question == "\n\n" + r["input"] and s.answers == [str(r["answer"][0])]

    r = _records("code_run")[0]
    call = re.search(r"func_\d+\(-?\d+\)", r["input"]).group(0)
    s = _samples(enc, "code_run", prompt_family="gpt4")[0]
    assert s.context + s.question + s.answer_prefix == (
        f"Following is a set of Python functions. There is a function called named {call.split('(')[0]}.\n\n"
        f"{r['context']}\n\nPlease give me the exact number of the return value of {call}. Be concise. Your "
        "response must end with the final returned value.")


def test_answer_prefixes_end_their_templates():
    for family in PROMPT_FAMILIES:
        assert set(TEMPLATES[family]) == set(TASKS)
        for task, prefix in ANSWER_PREFIX[family].items():
            template = TEMPLATES[family][task]
            assert template.endswith(prefix) and template[-len(prefix) - 1] in "\n ", (family, task)


# ------------------------------------------------------------------------------------------------ truncation
def test_keep_middle_cut_is_truncate_by_tokens():
    ids = list(range(10))
    assert keep_middle_cut(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert keep_middle_cut(ids, 7) == [0, 1, 2, 7, 8, 9]  # split = 7 // 2 on both sides
    with pytest.raises(KvbenchError):
        keep_middle_cut(ids, 1)


@pytest.mark.parametrize("task", TASKS)
def test_truncated_prompt_fits_and_keeps_the_question(enc, task):
    tok = enc.tokenizer
    L = 420
    for s, r in zip(_samples(enc, task, L), _records(task)):
        official = make_task(f"infinitebench/{task}", data_dir=str(FIX)).samples(enc, 1 << 16, None, 0)
        full = next(x for x in official if x.sample_id == s.sample_id)
        full_text = full.context + full.question + full.answer_prefix
        n = enc.count(s.context, s.question, s.answer_prefix)
        assert n <= L and s.meta["prompt_tokens"] == n
        assert s.meta["truncated"] and len(tok(full_text).input_ids) > L  # every fixture record is longer
        budget = s.meta["truncation_budget"]
        ids = tok(full_text).input_ids
        assert s.context + s.question + s.answer_prefix == tok.decode(keep_middle_cut(ids, budget),
                                                                     skip_special_tokens=True)
        if task != "longbook_qa_chn":
            assert budget == L  # exactly the official cut at max_length = context_length
        assert s.meta["truncated_tokens"] == len(ids) - 2 * (budget // 2)
        assert s.question == full.question and s.answer_prefix == full.answer_prefix  # the cut is in the document
        assert s.context.startswith(full.context[:len(full.context) - len(r["context"])])
        if task in SYNTHETIC:  # found where it is, or cut out with the middle
            assert all(s.context[a:b] == s.answers[0] for a, b in s.meta["evidence"])
            assert s.meta["needle_kept"] == bool(s.meta["evidence"]) == (s.answers[0] in s.context)
    if task in SYNTHETIC:  # the fixtures' needles are at the start, the middle and the end
        assert [s.meta["needle_kept"] for s in _samples(enc, task, L)] == [True, False, True]


def test_chat_template_comes_off_the_budget(enc):
    tok = copy.deepcopy(byte_tokenizer())
    tok.chat_template = "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n"
    chat = PromptEncoder(tok, chat=True)
    L = 500
    for s in _samples(chat, "longbook_qa_eng", L):
        assert chat.count(s.context, s.question, s.answer_prefix) <= L and s.meta["truncated"]
        assert s.meta["truncation_budget"] == L - (chat.count("", "") - 1)


def test_too_small_context_length_is_one_line(enc):
    with pytest.raises(KvbenchError) as err:
        _samples(enc, "longbook_choice_eng", 120)
    msg = str(err.value)
    assert "\n" not in msg and "context_length=120 is too small for infinitebench/longbook_choice_eng" in msg
    with pytest.raises(KvbenchError, match="context_length=60 is too short; its smallest prompt has"):
        make_task("infinitebench/passkey").samples(enc, 60, 1, 0)


# ------------------------------------------------------------------------------------------------ generated
@pytest.mark.parametrize("task", SYNTHETIC)
def test_generated_samples_follow_the_official_format(enc, task):
    t = make_task(f"infinitebench/{task}")
    L = 1536
    samples = t.samples(enc, L, 3, seed=5)
    assert [s.sample_id for s in samples] == [f"infinitebench/{task}/L{L}/s5/{i}" for i in range(3)]
    again = make_task(f"infinitebench/{task}").samples(enc, L, 3, seed=5)
    assert [(s.context, s.question, s.answers) for s in samples] == [(s.context, s.question, s.answers) for s in again]
    assert samples[0].context != make_task(f"infinitebench/{task}").samples(enc, L, 1, seed=6)[0].context
    head = TEMPLATES["yarn_mistral"][task].split("{context}")[0]
    for s in samples:
        assert L - 100 < enc.count_sample(s) <= L and s.meta["context_length"] == L  # within one line or pair
        assert s.meta["generated"] is True and 0 <= s.meta["depth"] <= 100
        assert s.max_new_tokens == MAX_NEW_TOKENS[task] and t.score(s.answers[0], s) == 1.0
        assert s.context.startswith(head)
        doc = s.context[len(head):]
        spans = s.meta["evidence"]
        assert spans and all(s.context[a:b] == s.answers[0] for a, b in spans)
        if task == "kv_retrieval":
            assert doc.startswith("JSON data:\n{") and len(spans) == 1
            pairs = json.loads(doc[len("JSON data:\n"):])
            key = re.fullmatch(r'\n\n\nKey: "(.+)"\nThe value associated with the specified key is: ', s.question)
            assert pairs[key.group(1)] == s.answers[0] and len(pairs) == s.meta["n_haystack"]
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.answers[0])
        else:
            needle = {"passkey": "The pass key is {k}. Remember it. {k} is the pass key.\n",
                      "number_string": "The sequence of digits is {k}. Remember it. {k} is the sequence of digits.\n"}
            lines = doc.splitlines(keepends=True)
            key = s.answers[0]
            assert lines.count(needle[task].format(k=key)) == 1 and lines.count(NOISE) == len(lines) - 1
            assert len(key) == (5 if task == "passkey" else 10) and key.isdigit() and len(spans) == 2
            at = lines.index(needle[task].format(k=key))
            assert s.meta["depth"] == round(100 * at / (len(lines) - 1))


def test_depth_parameter_places_the_needle(enc):
    for depth in (0, 100):
        for task in SYNTHETIC:
            s = make_task(f"infinitebench/{task}", depth=depth).samples(enc, 1024, 1, 0)[0]
            (a, _), = s.meta["evidence"][:1]
            doc_start = len(TEMPLATES["yarn_mistral"][task].split("{context}")[0])
            where = (a - doc_start) / (len(s.context) - doc_start)
            assert s.meta["depth"] == depth and (where < 0.1 if depth == 0 else where > 0.9), (task, depth, where)


def test_data_file_is_used_when_there(enc, tmp_path):
    samples = _samples(enc, "passkey", 1 << 16, n=None)
    assert [s.sample_id for s in samples] == [f"passkey/{r['id']}" for r in _records("passkey")]
    for s, r in zip(samples, _records("passkey")):
        assert s.meta["generated"] is False and s.answers == r["answer"]
        assert [s.context[a:b] for a, b in s.meta["evidence"]] == r["answer"] * 2
    head = len(TEMPLATES["yarn_mistral"]["passkey"].split("{context}")[0])
    for s, j in zip(samples, (0, 20, 40)):  # the fixture's needles follow j = 0, 20, 40 of 40 noise lines
        key_at = j * len(NOISE) + len("The pass key is ")
        assert s.meta["depth"] == round(100 * key_at / (len(s.context) - head))
    assert make_task("infinitebench/passkey", data_dir=str(tmp_path)).samples(enc, 512, 1, 0)[0].meta["generated"]
    with pytest.raises(KvbenchError, match="n_samples=null"):
        make_task("infinitebench/passkey").samples(enc, 512, None, 0)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_values_are_one_line(enc, tmp_path):
    def refused(match, fn):
        with pytest.raises(KvbenchError) as err:
            fn()
        assert "\n" not in str(err.value) and re.search(match, str(err.value)), str(err.value)
        return str(err.value)

    msg = refused("prompt_family='kimi' is not known; allowed: yarn_mistral", lambda: make_task(
        "infinitebench/code_debug", prompt_family="kimi"))
    assert "gpt4" in msg and "claude2" in msg
    refused("depth=101", lambda: make_task("infinitebench/passkey", depth=101))
    refused("depth=3 is for generated samples", lambda: make_task("infinitebench/passkey", data_dir=str(FIX), depth=3))
    refused("unknown task option", lambda: make_task("infinitebench/code_run", depth=3))
    msg = refused("reads code_run.jsonl from task.data_dir, which is null",
                  lambda: make_task("infinitebench/code_run").samples(enc, 512, 1, 0))
    assert DATA_URL.format(task="code_run") in msg
    msg = refused("code_run.jsonl not found", lambda: make_task("infinitebench/code_run", data_dir=str(tmp_path)))
    assert str(tmp_path) in msg and DATA_URL.format(task="code_run") in msg

    good = (FIX / "code_debug.jsonl").read_text("utf-8").splitlines()
    record = json.loads(good[0])
    for key, value, match in (("options", None, r"code_debug.jsonl:2: .*no 'options', which code_debug needs"),
                              ("answer", ["nope"], r"code_debug.jsonl:2: 'answer' \['nope'\] is not one of its"),
                              ("options", ["a", "b"], r"code_debug.jsonl:2: .*'options' must be a list of 4")):
        bad = {k: v for k, v in record.items() if k != key or value is not None}
        if value is not None:
            bad[key] = value
        (tmp_path / "code_debug.jsonl").write_text(good[0] + "\n" + json.dumps(bad) + "\n", "utf-8")
        refused(match, lambda: make_task("infinitebench/code_debug", data_dir=str(tmp_path)).samples(enc, 512, 1, 0))
    (tmp_path / "math_find.jsonl").write_text('{"context": "[1]", "input": "x", "answer": [1]}\n', "utf-8")
    refused(r"math_find.jsonl:1: 'input' has no \"The ... of\"",
            lambda: make_task("infinitebench/math_find", data_dir=str(tmp_path)).samples(enc, 512, 1, 0))
    (tmp_path / "code_run.jsonl").write_text('{"context": "c", "input": "func_1(2)", "answer": "four"}\n', "utf-8")
    refused(r"code_run.jsonl:1: 'answer' must be an integer",
            lambda: make_task("infinitebench/code_run", data_dir=str(tmp_path)).samples(enc, 512, 1, 0))
    (tmp_path / "passkey.jsonl").write_text('{"context": "c", "answer": ["1"]}\n', "utf-8")
    refused(r"passkey.jsonl:1: .*no 'input'",
            lambda: make_task("infinitebench/passkey", data_dir=str(tmp_path)).samples(enc, 512, 1, 0))


def test_cli_refuses_bad_values_in_one_line(capsys, tmp_path):
    from conftest import refused_in_process

    base = ["model=tiny-random", "n_samples=1", "context_length=512", f"hydra.run.dir={tmp_path}/run"]
    line = refused_in_process(capsys, "task=infinitebench/passkey", "task.prompt_family=kimi", *base)
    assert "prompt_family='kimi' is not known" in line
    (tmp_path / "data").mkdir()
    line = refused_in_process(capsys, "task=infinitebench", f"task.data_dir={tmp_path}/data", *base)
    assert "longdialogue_qa_eng.jsonl not found in task.data_dir" in line  # the suite's first file-based task
    assert not (tmp_path / "run").exists()  # both refused before Hydra made the run dir
    line = refused_in_process(capsys, "task=infinitebench/math_find", *base)
    assert "math_find.jsonl from task.data_dir, which is null" in line


# ------------------------------------------------------------------------------------------------ end to end
def test_tiny_run_of_the_suite_on_the_fixture_files(tmp_path):
    from hydra import compose, initialize_config_dir

    from harness.runner import run

    with initialize_config_dir(config_dir=str(CONF.parent.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "task=infinitebench", f"task.data_dir={FIX}", "n_samples=2", "context_length=400", "max_new_tokens=2",
            "keep_ratio=0.5", "method=snapkv", "model=tiny-random", "progress=false"])
    run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert sorted({r["task"] for r in rows}) == sorted(f"infinitebench/{t}" for t in TASKS)
    assert len(rows) == 2 * len(TASKS)
    assert all(r["error"] is None and 0.0 <= r["score"] <= 1.0 and r["context_tokens"] <= 400 for r in rows)
    assert all(r["meta"]["generated"] is False and r["meta"]["prompt_family"] == "yarn_mistral" for r in rows)
    assert any(r["meta"]["truncated"] for r in rows)
