"""The math suite (MATH-500, AIME 2024, AIME 2025): registry and configs, the loaders of every official layout (JSON
lines, parquet, a download in its repo-named subfolder) and their one-line refusals, the prompt filled by hand with
and without a chat template, the <think> handling, math-verify's own verdicts (tests/fixtures/math/verify_cases.json,
tools/official/dump_math_verify.py) against our metric, the no-truncation length rule, one tiny run end to end.

Every problem in the fixtures is ours, written in the official formats; none is an AIME or MATH problem."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from conftest import refused_in_process

from harness.errors import KvbenchError
from harness.tokenizer import byte_tokenizer
from tasks import expand, get_task
from tasks.base import PromptEncoder
from tasks.math import answer_part, extraction, judge, make_task
from tasks.math.config import DIRECTIVE, MAX_NEW_TOKENS

FIX = Path(__file__).parent / "fixtures" / "math"
CONF = Path(__file__).parent.parent / "conf" / "task"
VERIFY = json.loads((FIX / "verify_cases.json").read_text("utf-8"))
NAMES = ["math/aime24", "math/aime25", "math/math500"]


@pytest.fixture(scope="module")
def enc():
    return PromptEncoder(byte_tokenizer())


def _chat_encoder(template: str) -> PromptEncoder:
    tok = copy.deepcopy(byte_tokenizer())
    tok.chat_template = template
    return PromptEncoder(tok, chat=True)


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def _parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _samples(name, data_dir, encoder, n=None, context_length=4096):
    return make_task(name, data_dir=str(data_dir)).samples(encoder, context_length, n, 0)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_and_configs():
    import yaml

    assert expand("math") == NAMES
    for name in NAMES:
        task = get_task(name)  # no data_dir: built (the registry's check); refused only when samples are read
        assert task.name == name and task.info["suite"] == "math" and task.finite and task.reads_data
        assert task.lengths(2048) == [2048] and task.max_questions_per_context() is None
        raw = yaml.safe_load((CONF / f"{name}.yaml").read_text())
        assert raw == {"defaults": ["/task/math/_defaults@_global_", "_self_"], "name": name, "data_dir": None}
    assert yaml.safe_load((CONF / "math.yaml").read_text()) == {
        "defaults": ["/task/math/_defaults@_global_", "_self_"], "name": "math", "data_dir": None, "exclude": []}
    with pytest.raises(KvbenchError, match="unknown task option.*depth; allowed: data_dir"):
        get_task("math/aime24", depth=3)
    with pytest.raises(KeyError):
        make_task("longbench/aime24")
    with pytest.raises(KeyError):
        make_task("math/aime23")


@pytest.mark.parametrize("task", ["math", "math/aime25"])
def test_run_defaults_every_problem_prefilled_whole(task):
    from hydra import compose, initialize_config_dir

    from harness.runner import check_config, suite_tasks

    with initialize_config_dir(config_dir=str(CONF.parent.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=[f"task={task}", f"task.data_dir={FIX}", "model=tiny-random"])
        short = compose(config_name="config", overrides=[f"task={task}", "n_samples=3", "max_new_tokens=64",
                                                         "context_length=1024", "query_aware=false"])
    assert cfg.n_samples is None and cfg.query_aware is True and cfg.context_length == 4096
    assert cfg.max_new_tokens is None  # the task's own: 32768
    assert (short.n_samples, short.max_new_tokens, short.context_length, short.query_aware) == (3, 64, 1024, False)
    settings, _, built = check_config(cfg, model_files=False)
    assert list(built) == suite_tasks(cfg.task) == (NAMES if task == "math" else [task])


# ------------------------------------------------------------------------------------------------ prompts
HAND_RAW = ("What is $3 + 4 \\cdot 2$?\n"
            "Please reason step by step, and put your final answer within \\boxed{}.\n"
            "Solution:")
HAND_USER = ("Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in the "
             "form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$\n"
             "Please reason step by step, and put your final answer within \\boxed{}.")
# (a template's last newline is dropped by jinja unless printed as an expression)
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}{{ '<|assistant|>\\n' }}"
R1_CHAT = "{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}{{ '<｜Assistant｜><think>\\n' }}"


def test_prompt_without_chat_template_is_filled_by_hand(enc):
    s = _samples("math/math500", FIX, enc)[0]
    assert s.sample_id == "test/prealgebra/9001.json" and enc.text_sample(s) == HAND_RAW
    assert (s.context, s.question, s.answer_prefix) == (HAND_RAW[:-len("\nSolution:")], "", "\nSolution:")
    assert s.answers == ["11"] and s.max_new_tokens == MAX_NEW_TOKENS == 32768
    assert s.meta["prompt"] == "r1_boxed_raw" and s.meta["prompt_tokens"] == enc.count_sample(s) == len(HAND_RAW) + 1
    assert DIRECTIVE == "Please reason step by step, and put your final answer within \\boxed{}."


def test_prompt_with_chat_template_is_the_user_turn(enc):
    chat = _chat_encoder(CHAT)
    s = _samples("math/math500", FIX, chat)[4]  # its problem ends with a newline: stripped
    assert chat.text_sample(s) == "<|user|>\n" + HAND_USER + "<|end|>\n<|assistant|>\n"
    assert (s.context, s.question, s.answer_prefix) == (HAND_USER, "", "")
    ctx_ids, q_ids = chat.encode_sample(s)
    assert chat.tokenizer.decode(q_ids) == "<|end|>\n<|assistant|>\n"  # all a query-agnostic run adds after compressing
    assert s.meta["prompt"] == "r1_boxed" and s.meta["prompt_opens_think"] is False
    assert PromptEncoder.for_task(chat.tokenizer, make_task("math/math500"), chat=True).chat  # no opt-out


def test_template_that_opens_think_is_recorded_and_scored(enc):
    r1 = _chat_encoder(R1_CHAT)
    s = _samples("math/aime24", FIX, r1)[0]
    assert r1.text_sample(s) == ("<｜User｜>Find the remainder when $2^{10}$ is divided by $1000$.\n" + DIRECTIVE
                                 + "<｜Assistant｜><think>\n")
    assert s.meta["prompt_opens_think"] is True
    task = make_task("math/aime24", data_dir=str(FIX))
    assert task.score("2^10 = 1024, maybe \\boxed{1024}?\n</think>\n\nThe remainder is \\boxed{24}.", s) == 1.0
    assert task.score("so \\boxed{24}</think>\n\nThe remainder is \\boxed{1024}.", s) == 0.0
    assert task.prediction_meta("so \\boxed{24}</think>\n\nThe remainder is \\boxed{1024}.", s) == {
        "extracted_answer": "1024", "think": "closed"}
    # stopped inside the reasoning: extracted from the whole text
    assert task.score("2^10 = 1024, so \\boxed{24} and", s) == 1.0
    assert task.prediction_meta("2^10 = 1024, so \\boxed{24} and", s)["think"] == "unclosed"


# ------------------------------------------------------------------------------------------------ loaders
def test_fixture_layouts_load_with_their_meta(enc):
    math500 = _samples("math/math500", FIX, enc)
    assert [s.meta["level"] for s in math500] == [1, 2, 3, 2, 2]
    assert {s.meta["subject"] for s in math500} == {"Prealgebra", "Algebra", "Precalculus"}
    assert all(s.meta["source"] == "HuggingFaceH4/MATH-500" and s.meta["unique_id"] == s.sample_id for s in math500)
    aime24 = _samples("math/aime24", FIX, enc)
    assert [s.sample_id for s in aime24] == ["2024-I-1", "2024-I-2", "2024-II-1"]
    assert [s.answers for s in aime24] == [["24"], ["9"], ["18"]]  # int64 answers become text
    assert [(s.meta["year"], s.meta["part"], s.meta["number"]) for s in aime24] == [
        (2024, "I", 1), (2024, "I", 2), (2024, "II", 1)]
    aime25 = _samples("math/aime25", FIX, enc)
    assert [s.sample_id for s in aime25] == ["2025-I-1", "2025-I-2", "2025-II-1", "2025-II-2"]
    assert {s.meta["source"] for s in aime25} == {"opencompass/AIME2025"}
    assert [s.meta["file"] for s in aime25] == ["aime2025-I.jsonl"] * 2 + ["aime2025-II.jsonl"] * 2


def test_seeded_subset_in_file_order(enc):
    ids = [s.sample_id for s in _samples("math/math500", FIX, enc, n=2)]
    assert len(ids) == 2 and ids == [s.sample_id for s in _samples("math/math500", FIX, enc, n=2)]
    order = [s.sample_id for s in _samples("math/math500", FIX, enc)]
    assert ids == sorted(ids, key=order.index)


H4_AIME24 = [{"id": 60 + i, "problem": f"Our problem {i}: compute ${i} + {i}$.", "solution": f"$\\boxed{{{2 * i}}}$",
              "answer": str(2 * i), "year": "2024",
              "url": f"https://artofproblemsolving.com/wiki/index.php/2024_AIME_{part}_Problems/Problem_{n}"}
             for i, (part, n) in enumerate([("I", 1), ("II", 3)], 1)]


def test_hub_parquet_layouts(tmp_path, enc):
    _parquet(tmp_path / "aime_2024" / "data" / "train-00000-of-00001.parquet", H4_AIME24)  # a repo-named subfolder
    s = _samples("math/aime24", tmp_path, enc)
    assert [x.sample_id for x in s] == ["2024-I-1", "2024-II-3"] and s[1].meta["record_id"] == 62
    assert s[0].meta["source"] == "HuggingFaceH4/aime_2024" and s[0].context.startswith("Our problem 1: compute")
    maxwell = tmp_path / "maxwell"
    _parquet(maxwell / "aime_2024_problems.parquet", [{"ID": "2024-II-15", "Problem": "Ours.", "Solution": "x",
                                                      "Answer": 7}])
    (m,) = _samples("math/aime24", maxwell, enc)
    assert (m.sample_id, m.answers, m.meta["source"]) == ("2024-II-15", ["7"], "Maxwell-Jia/AIME_2024")
    arena = tmp_path / "arena"  # MathArena/aime_2025's layout: problem_idx, no part
    _parquet(arena / "data" / "train-00000-of-00001.parquet",
             [{"problem_idx": i, "problem": f"Ours {i}.", "answer": i * 11, "problem_type": ["Algebra"]}
              for i in (1, 2)])
    a = _samples("math/aime25", arena, enc)
    assert [(x.sample_id, x.answers, x.meta["part"], x.meta["number"]) for x in a] == [
        ("1", ["11"], None, 1), ("2", ["22"], None, 2)]


def test_suite_dir_of_repo_subfolders(tmp_path, enc):
    shutil.copy(FIX / "test.jsonl", _jsonl(tmp_path / "MATH-500" / "test.jsonl", []))
    for part in ("I", "II"):
        shutil.copy(FIX / f"aime2025-{part}.jsonl", _jsonl(tmp_path / "AIME2025" / f"aime2025-{part}.jsonl", []))
    _parquet(tmp_path / "aime_2024" / "data" / "train-00000-of-00001.parquet", H4_AIME24)
    counts = {name: len(get_task(name, suite="math", data_dir=str(tmp_path)).samples(enc, 4096, None, 0))
              for name in expand("math")}
    assert counts == {"math/aime24": 2, "math/aime25": 4, "math/math500": 5}


def test_parquet_without_pyarrow(tmp_path, enc, monkeypatch):
    import sys

    _parquet(tmp_path / "aime_2024_problems.parquet", [{"ID": "2024-I-1", "Problem": "Ours.", "Solution": "x",
                                                       "Answer": 3}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(KvbenchError) as err:
        _samples("math/aime24", tmp_path, enc)
    msg = str(err.value)
    assert "\n" not in msg and "aime_2024_problems.parquet: a parquet file, and pyarrow" in msg
    assert "aime_2024_problems.jsonl" in msg
    _jsonl(tmp_path / "aime_2024_problems.jsonl", [{"ID": "2024-I-1", "Problem": "Ours.", "Solution": "x",
                                                   "Answer": 3}])
    assert [s.answers for s in _samples("math/aime24", tmp_path, enc)] == [["3"]]  # the converted file: no pyarrow


def _load_error(name, data_dir, enc) -> str:
    with pytest.raises(KvbenchError) as err:
        _samples(name, data_dir, enc)
    assert "\n" not in str(err.value)
    return str(err.value)


MATH_ROW = json.loads((FIX / "test.jsonl").read_text("utf-8").splitlines()[0])


@pytest.mark.parametrize("rows, needle", [
    ([{k: v for k, v in MATH_ROW.items() if k != "answer"}],
     "test.jsonl:1: no 'answer' (HuggingFaceH4/MATH-500 records have problem, solution, answer, subject, level"),
    ([MATH_ROW, {**MATH_ROW, "answer": ["11"]}], "test.jsonl:2: 'answer' is a list, not a string or an integer"),
    ([{**MATH_ROW, "problem": "  "}], "test.jsonl:1: 'problem' is empty"),
    ([{**MATH_ROW, "level": 7}], "'level' is 7, not an integer 1..5"),
    ([MATH_ROW, MATH_ROW], "test.jsonl:2: the id 'test/prealgebra/9001.json' of "),
    ([["a list"]], "test.jsonl:1: a list, not a JSON object"),
])
def test_malformed_math500_record_is_named(tmp_path, enc, rows, needle):
    _jsonl(tmp_path / "test.jsonl", rows)
    msg = _load_error("math/math500", tmp_path, enc)
    assert needle in msg and str(tmp_path / "test.jsonl") in msg


@pytest.mark.parametrize("text, needle", [("", "holds no MATH-500 records (empty file)"),
                                          ('{"problem": ', "test.jsonl:1: malformed JSON in MATH-500 data")])
def test_malformed_jsonl_file_is_named(tmp_path, enc, text, needle):
    (tmp_path / "test.jsonl").write_text(text, "utf-8")
    assert needle in _load_error("math/math500", tmp_path, enc)


def test_malformed_aime_files_are_named(tmp_path, enc):
    bad = tmp_path / "year"
    _jsonl(bad / "aime_2024_problems.jsonl", [{"ID": "2025-I-1", "Problem": "Ours.", "Solution": "x", "Answer": 1}])
    assert "row" not in (msg := _load_error("math/aime24", bad, enc))
    assert "a problem of AIME 2025, not of AIME 2024 (wrong file for this task)" in msg
    half = tmp_path / "half"  # opencompass's layout needs both parts
    shutil.copy(FIX / "aime2025-I.jsonl", _jsonl(half / "aime2025-I.jsonl", []))
    assert "no AIME 2025 data in task.data_dir=" in _load_error("math/aime25", half, enc)
    corrupt = tmp_path / "corrupt"
    (corrupt / "data").mkdir(parents=True)
    (corrupt / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet at all")
    assert "train-00000-of-00001.parquet: not a readable parquet file" in _load_error("math/aime24", corrupt, enc)
    boolean = tmp_path / "bool"
    _jsonl(boolean / "aime2025-I.jsonl", [{"question": "Ours.", "answer": True}])
    _jsonl(boolean / "aime2025-II.jsonl", [{"question": "Ours.", "answer": "1"}])
    assert "aime2025-I.jsonl:1: 'answer' is a bool, not a string or an integer" in _load_error("math/aime25",
                                                                                               boolean, enc)


BASE = ["model=tiny-random", "max_new_tokens=2", "progress=false"]


@pytest.mark.parametrize("args, needle", [
    (["task=math/math500", "task.data_dir={empty}"],
     "math/math500: no MATH-500 data in task.data_dir='{empty}': looked for test.jsonl of HuggingFaceH4/MATH-500, "
     "there and in its subfolder MATH-500/; get it from https://huggingface.co/datasets/HuggingFaceH4/MATH-500"),
    (["task=math/aime25"], "math/aime25 reads aime2025-I.jsonl + aime2025-II.jsonl of opencompass/AIME2025; "
     "data/train-*.parquet (or .jsonl) of yentinglin/aime_2025 from task.data_dir, which is null"),
    (["task=math/math500", "task.data_dir={bad}"], "test.jsonl:2: 'answer' is a list, not a string or an integer"),
    (["task=math/aime24", "task.data_dir={fix}", "+task.cot=true"], "unknown task option(s) cot; allowed: data_dir"),
    (["task=math/math500", "task.data_dir={fix}", "context_length=200"],
     "problem 'test/precalculus/9005.json' takes 243 prompt tokens, more than context_length=200"),
])
def test_bad_values_are_one_line(capsys, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    _jsonl(tmp_path / "bad" / "test.jsonl", [MATH_ROW, {**MATH_ROW, "answer": ["11"]}])
    paths = {"empty": tmp_path / "empty", "bad": tmp_path / "bad", "fix": FIX}
    line = refused_in_process(capsys, *BASE, *[a.format(**paths) for a in args], f"hydra.run.dir={tmp_path / 'run'}")
    assert needle.format(**paths) in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ length rule
def test_prompt_is_never_truncated_and_a_longer_one_is_refused(enc):
    samples = _samples("math/math500", FIX, enc, context_length=4096)
    longest = max(s.meta["prompt_tokens"] for s in samples)
    # the byte tokenizer: BOS + one token per UTF-8 byte of the whole prompt (HAND_USER's problem is the longest)
    assert longest == 1 + len((HAND_USER + "\nSolution:").encode()) == 243
    assert all(s.context.endswith(DIRECTIVE) for s in samples)
    with pytest.raises(KvbenchError) as err:
        _samples("math/math500", FIX, enc, context_length=longest - 1)
    msg = str(err.value)
    assert "never truncated" in msg and msg.endswith(f"use context_length >= {longest}")
    fitted = _samples("math/math500", FIX, enc, context_length=longest)  # the length it names is enough
    assert [s.context for s in fitted] == [s.context for s in samples]


# ------------------------------------------------------------------------------------------------ think + metric
@pytest.mark.parametrize("case", VERIFY["cases"], ids=lambda c: c["name"])
def test_metric_equals_math_verify(case):
    part, _ = answer_part(case["prediction"], case["prompt_opens_think"])
    assert part == case["answer_text"]  # the think rule against the part written out by hand
    assert judge(case["prediction"], case["gold"], case["prompt_opens_think"]) is case["verify"]


def test_fixture_covers_the_answer_kinds():
    cases = VERIFY["cases"]
    assert len(cases) >= 20 and VERIFY["library"] == "math-verify" and VERIFY["version"]
    assert {True, False} == {c["verify"] for c in cases}
    names = " ".join(c["name"] for c in cases)
    for kind in ("fraction", "decimal", "set", "tuple", "interval", "units", "text", "no_box", "wrong", "unclosed"):
        assert kind in names, kind


@pytest.mark.parametrize("text, opens, part, how", [
    ("no tags \\boxed{1}", False, "no tags \\boxed{1}", "none"),
    ("<think>a</think>b", False, "b", "closed"),
    ("<think>a</think>b<think>c</think>d", False, "bd", "closed"),  # lighteval removes each block
    ("a</think>b</think>c", True, "c", "closed"),
    ("a</think>b", False, "b", "closed"),
    ("<think>a", False, "<think>a", "unclosed"),
    ("a", True, "a", "unclosed"),
    ("<think>a</think>b<think>c", False, "b<think>c", "unclosed"),
])
def test_answer_part_rule(text, opens, part, how):
    assert answer_part(text, opens) == (part, how)


def test_extraction_records_the_matched_answer():
    assert extraction("<think>\\boxed{3}</think>So \\boxed{\\frac{1}{2}}.") == {"extracted_answer": "\\frac{1}{2}",
                                                                                "think": "closed"}
    assert extraction("nothing here") == {"extracted_answer": None, "think": "none"}


# ------------------------------------------------------------------------------------------------ end to end
def test_tiny_run_writes_scored_rows(tmp_path):
    from harness import cli
    from harness.io import read_rows

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIX / "test.jsonl", data / "test.jsonl")
    cli.main(["task=math/math500", f"task.data_dir={data}", "model=tiny-random", "n_samples=2", "max_new_tokens=4",
              "progress=false", f"hydra.run.dir={tmp_path / 'run'}"])
    rows, _ = read_rows(tmp_path / "run" / "predictions.jsonl")
    by_id = {json.loads(line)["unique_id"]: json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()}
    assert len(rows) == 2 and {r["task"] for r in rows} == {"math/math500"}
    for r in rows:
        record = by_id[r["sample_id"]]
        assert r["error"] is None and r["answers"] == [record["answer"]] and r["query_aware"] is True
        assert (r["meta"]["subject"], r["meta"]["level"]) == (record["subject"], record["level"])
        assert r["score"] == float(judge(r["prediction"], record["answer"])) and r["context_length"] == 4096
        assert {k: r["meta"][k] for k in ("extracted_answer", "think")} == extraction(r["prediction"])
