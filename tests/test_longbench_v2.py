"""LongBench v2: registry and configs, data.json loading and its one-line errors, the official prompts filled by
hand, pred.py's truncation and the context/question split, the metric and result.py's table against the official
code's outputs (tests/fixtures/longbench_v2/metric_cases.json), the report section, one tiny run end to end."""
from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path

import pytest
from conftest import refused_in_process

from harness.errors import KvbenchError
from harness.tokenizer import byte_tokenizer
from tasks import expand, get_task
from tasks.base import PromptEncoder
from tasks.longbench_v2 import make_task
from tasks.longbench_v2.aggregate import predictions, report_section
from tasks.longbench_v2.config import DATA_URL, DOMAINS, TEMPLATES
from tasks.longbench_v2.metrics import aggregate, extract_answer, judge
from tasks.longbench_v2.prompt import (cot_answer_prompt, fill, official_halves, official_prompt,
                                       split_at_document_end, truncate)

FIX = Path(__file__).parent / "fixtures" / "longbench_v2"
CONF = Path(__file__).parent.parent / "conf" / "task"
RECORDS = json.loads((FIX / "data.json").read_text("utf-8"))
OFFICIAL = json.loads((FIX / "metric_cases.json").read_text("utf-8"))
BY_ID = {r["_id"]: r for r in RECORDS}


@pytest.fixture(scope="module")
def enc():
    return PromptEncoder(byte_tokenizer())


def _task(short, **kw):
    return make_task(f"longbench_v2/{short}", data_dir=str(FIX), **kw)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_and_fixture_cover_every_domain_difficulty_and_length():
    assert expand("longbench_v2") == [f"longbench_v2/{s}" for s in DOMAINS] and len(DOMAINS) == 6
    for short, domain in DOMAINS.items():
        task = get_task(f"longbench_v2/{short}", data_dir=None)
        assert task.name == f"longbench_v2/{short}" and task.info == {"suite": "longbench_v2", "domain": domain,
                                                                       "metric": "accuracy"}
        assert task.finite and task.reads_data and not task.skip_chat_template
    assert {r["domain"] for r in RECORDS} == set(DOMAINS.values())
    assert {(r["difficulty"], r["length"]) for r in RECORDS} == {(d, n) for d in ("easy", "hard")
                                                                 for n in ("short", "medium", "long")}
    with pytest.raises(KvbenchError, match="unknown task option.*allowed: data_dir, cot"):
        get_task("longbench_v2/code_repo", depth=3)
    with pytest.raises(KeyError):
        make_task("longbench/code_repo")


DEFAULTS = ["/task/longbench_v2/_defaults@_global_", "_self_"]


def test_configs_name_every_task():
    import yaml

    assert yaml.safe_load((CONF / "longbench_v2.yaml").read_text()) == {
        "defaults": DEFAULTS, "name": "longbench_v2", "data_dir": None, "cot": False}
    files = sorted(p.stem for p in (CONF / "longbench_v2").glob("*.yaml") if not p.name.startswith("_"))
    assert files == sorted(DOMAINS)
    for short in DOMAINS:
        assert yaml.safe_load((CONF / "longbench_v2" / f"{short}.yaml").read_text()) == {
            "defaults": DEFAULTS, "name": f"longbench_v2/{short}", "data_dir": None, "cot": False}


@pytest.mark.parametrize("task", ["longbench_v2", "longbench_v2/long_icl"])
def test_defaults_are_all_questions_query_aware(task):
    from hydra import compose, initialize_config_dir

    from harness.schema import validate

    with initialize_config_dir(config_dir=str(CONF.parent.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=[f"task={task}"])
        off = compose(config_name="config", overrides=[f"task={task}", "query_aware=false", "n_samples=3"])
    assert cfg.n_samples is None and cfg.query_aware is True and validate(cfg).n_samples is None
    assert set(cfg.task) == {"name", "data_dir", "cot"}
    assert off.query_aware is False and off.n_samples == 3


# ------------------------------------------------------------------------------------------- prompts
# lbv2fix12 through prompts/0shot.txt and 0shot_cot.txt, typed out by hand.
HAND_0SHOT = (
    "Please read the following text and answer the question below.\n"
    "\n"
    "<text>\n"
    "(Ada, parent_of, Ben)\n(Ben, parent_of, Cleo)\n(Dana, sibling_of, Ben)\n(Eli, friend_of, Cleo)\n"
    "</text>\n"
    "\n"
    "What is the correct answer to this question: Who is the grandparent of Cleo?\n"
    "Choices:\n"
    "(A) Ada\n"
    "(B) Ben\n"
    "(C) Dana\n"
    "(D) Eli\n"
    "\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
HAND_COT_TAIL = ("What is the correct answer to this question: Who is the grandparent of Cleo?\nChoices:\n(A) Ada\n"
                 "(B) Ben\n(C) Dana\n(D) Eli\n\nLet\u2019s think step by step:")


def test_prompt_is_the_official_template_filled_by_hand(enc):
    s = _task("structured_data").samples(enc, 1 << 16, None, 0)[1]
    assert s.sample_id == "lbv2fix12" and s.context + s.question + s.answer_prefix == HAND_0SHOT
    assert s.context == HAND_0SHOT[:HAND_0SHOT.index("What is the correct")]  # the document and all before it
    assert s.answers == ["A"] and s.max_new_tokens == 128 and s.meta["prompt"] == "0shot"
    assert s.meta["cot_mode"] is None and not s.meta["truncated"]
    cot = _task("structured_data", cot=True).samples(enc, 1 << 16, None, 0)[1]
    assert cot.question == HAND_COT_TAIL and cot.max_new_tokens == 1024 + 128
    assert cot.context == s.context.replace("the question below", "the questions below")
    assert cot.meta["prompt"] == "0shot_cot" and cot.meta["cot_mode"] == "single_pass"
    assert cot_answer_prompt(BY_ID["lbv2fix12"], "  Ben is Cleo's parent.\n") == (
        "Please read the following text and answer the questions below.\n\nThe text is too long and omitted here.\n\n"
        + HAND_COT_TAIL + " Ben is Cleo's parent.\n\nBased on the above, what is the single, most likely answer "
        'choice? Format your response as follows: "The correct answer is (insert answer here)".')


def test_fields_are_stripped_and_placeholders_replaced_in_chain_as_pred_py():
    record = {**BY_ID["lbv2fix12"], "context": "\n  see $Q$ and $C_B$ \n", "question": "  Why $C_A$? ",
              "choice_A": " one ", "choice_B": "two\n"}
    context, question = official_prompt(record, "0shot")
    # .replace('$DOC$', ...) first, then '$Q$', '$C_A$', ...: the document's placeholders are filled too
    assert context.endswith("<text>\nsee Why one? and two\n</text>\n\n")
    assert question.startswith("What is the correct answer to this question: Why one?\nChoices:\n(A) one\n(B) two\n")


def test_filling_the_two_parts_equals_filling_the_whole():
    rng = random.Random(0)
    pieces = ["$", "Q", "$Q$", "$C_", "A", "D", "$DOC$", "\n", "W", "</text>", "$C_D$", "x"]
    for _ in range(300):
        record = {k: "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
                  for k in ("context", "question", "choice_A", "choice_B", "choice_C", "choice_D")}
        for name in ("0shot", "0shot_cot"):
            head, tail = official_prompt(record, name)
            assert head + tail == fill(TEMPLATES[name], record)
    assert split_at_document_end(TEMPLATES["0shot"])[1].startswith("What is the correct answer")


def test_every_fixture_record_untruncated(enc):
    for short in DOMAINS:
        for s in _task(short).samples(enc, 1 << 16, None, 0):
            r = BY_ID[s.sample_id]
            assert s.context + s.question == fill(TEMPLATES["0shot"], r) and s.context.endswith("\n</text>\n\n")
            assert s.meta["official_prompt_tokens"] == s.meta["prompt_tokens"] == enc.count(s.context, s.question)
            assert {k: s.meta[k] for k in ("domain", "sub_domain", "difficulty", "length", "answer")} == \
                {k: r[k] for k in ("domain", "sub_domain", "difficulty", "length", "answer")}


# ------------------------------------------------------------------------------------------- truncation
def test_official_halves_is_pred_py_slicing():
    ids = list(range(10))
    assert official_halves(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert official_halves(ids, 7) == [0, 1, 2, 6, 7, 8, 9]  # -7//2 == -4: the odd token goes to the end
    with pytest.raises(KvbenchError):
        official_halves(ids, 1)


def test_truncation_keeps_head_and_tail_and_fits(enc):
    tok = enc.tokenizer
    full = fill(TEMPLATES["0shot"], BY_ID["lbv2fix02"])
    ids = tok(full).input_ids  # BOS + bytes; the BOS is in the head half and skipped on decode
    assert truncate(full, tok, 801).prompt == tok.decode(ids[:400] + ids[-401:], skip_special_tokens=True)
    task = _task("single_doc_qa")
    for L in (750, 800, 1001):
        samples = task.samples(enc, L, None, 0)
        long = samples[1]
        assert long.meta["truncated"] and long.meta["truncation_budget"] == L  # bytes: no drift at the cut
        assert long.context + long.question == truncate(full, tok, L).prompt
        assert long.question == official_prompt(BY_ID["lbv2fix02"], "0shot")[1]  # the question survived whole
        assert enc.count(long.context, long.question) == L == long.meta["prompt_tokens"]
        assert not samples[0].meta["truncated"] and samples[0].meta["prompt_tokens"] <= L


def test_chat_template_comes_off_the_budget():
    tok = copy.deepcopy(byte_tokenizer())
    tok.chat_template = "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n"
    chat = PromptEncoder(tok, chat=True)
    overhead = chat.count("", "") - 1
    s = _task("single_doc_qa").samples(chat, 900, None, 0)[1]
    assert s.meta["truncated"] and s.meta["truncation_budget"] == 900 - overhead
    assert chat.count(s.context, s.question) <= 900
    assert chat.text(s.context, s.question).startswith("<|user|>\nPlease read the following text")


def test_too_short_context_length_is_one_line(enc):
    with pytest.raises(KvbenchError) as err:
        _task("single_doc_qa").samples(enc, 300, None, 0)
    msg = str(err.value)
    assert "\n" not in msg and "context_length=300 is too short" in msg and "lbv2fix01" in msg
    need = int(msg.rsplit(">= ", 1)[1])
    assert _task("single_doc_qa").samples(enc, need, 1, 0)  # the length it names is enough for that question


def test_selection_is_seeded_subset_in_file_order(enc):
    task = make_task("longbench_v2/code_repo", data_dir=str(FIX))
    assert [s.sample_id for s in task.samples(enc, 1 << 16, None, 0)] == ["lbv2fix09", "lbv2fix10"]
    one = [s.sample_id for s in task.samples(enc, 1 << 16, 1, 0)]
    assert len(one) == 1 and one == [s.sample_id for s in task.samples(enc, 1 << 16, 1, 0)]


# ------------------------------------------------------------------------------------------------ data errors
def _write(tmp_path, value) -> str:
    (tmp_path / "data.json").write_text(value if isinstance(value, str) else json.dumps(value), "utf-8")
    return str(tmp_path)


def _load_error(data_dir, enc) -> str:
    with pytest.raises(KvbenchError) as err:
        make_task("longbench_v2/single_doc_qa", data_dir=data_dir).samples(enc, 4096, None, 0)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_file_names_file_dir_and_url(tmp_path, enc):
    msg = _load_error(str(tmp_path), enc)
    assert "data.json" in msg and str(tmp_path) in msg and DATA_URL in msg


@pytest.mark.parametrize("edit, needle", [
    (lambda rs: rs[3].pop("answer"), "record 3 (_id 'lbv2fix04') has no 'answer'"),
    (lambda rs: rs[0].update(choice_C=3), "record 0 (_id 'lbv2fix01'): 'choice_C' is a int, not a string"),
    (lambda rs: rs[5].update(answer="E"), "record 5 (_id 'lbv2fix06'): answer='E' is not allowed; allowed: A, B"),
    (lambda rs: rs[1].update(difficulty="medium"), "difficulty='medium' is not allowed; allowed: easy, hard"),
    (lambda rs: rs[2].update(length="tiny"), "length='tiny' is not allowed; allowed: short, medium, long"),
    (lambda rs: rs[2].update(domain="Chat"), "domain='Chat' is not allowed; allowed: Single-Document QA"),
    (lambda rs: rs[7].update(_id="lbv2fix01"), "record 7 has the _id 'lbv2fix01' of record 0"),
    (lambda rs: rs.__setitem__(4, ["x"]), "record 4 is a list, not a JSON object"),
])
def test_malformed_record_is_named(tmp_path, enc, edit, needle):
    records = copy.deepcopy(RECORDS)
    edit(records)
    msg = _load_error(_write(tmp_path, records), enc)
    assert needle in msg and str(tmp_path / "data.json") in msg


@pytest.mark.parametrize("text, needle", [("{}", "a JSON list of LongBench v2 records is needed, not a dict"),
                                          ("[]", "no LongBench v2 records"), ("[{", "malformed JSON")])
def test_malformed_file_is_named(tmp_path, enc, text, needle):
    assert needle in _load_error(_write(tmp_path, text), enc)


def test_no_data_dir_offline_then_hub(monkeypatch, tmp_path, enc):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _load_error(None, enc)
    assert "task.data_dir is null" in msg and DATA_URL in msg
    import huggingface_hub

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, repo_type: calls.append((repo, filename, repo_type)) or
                        str(FIX / "data.json"))
    s = make_task("longbench_v2/single_doc_qa").samples(enc, 1 << 16, None, 0)
    assert calls == [("THUDM/LongBench-v2", "data.json", "dataset")] and [x.sample_id for x in s] == \
        ["lbv2fix01", "lbv2fix02"]


# ------------------------------------------------------------------------------------- metric vs official code
def test_templates_are_the_official_files():
    assert OFFICIAL["commit"] == "2e00731f8d0bff23dc4325161044d0ed8af94c1e"
    for name, sha in OFFICIAL["template_sha256"].items():
        assert hashlib.sha256(TEMPLATES[name].encode("utf-8")).hexdigest() == sha, name


@pytest.mark.parametrize("case", OFFICIAL["extract_cases"], ids=lambda c: repr(c["response"][:30]))
def test_extract_answer_matches_pred_py(case, enc):
    assert extract_answer(case["response"].strip()) == case["pred"]
    assert judge(case["response"], case["answer"]) is case["judge"]
    s = _task("structured_data").samples(enc, 1 << 16, 1, 0)[0]
    s.answers = [case["answer"]]
    assert _task("structured_data").score(case["response"], s) == float(case["judge"])


@pytest.mark.parametrize("case", OFFICIAL["aggregate_cases"], ids=lambda c: c["name"])
def test_aggregate_matches_result_py(case):
    items = [{**i, "pred": extract_answer(i["response"].strip()), "judge": judge(i["response"], i["answer"])}
             for i in case["items"]]
    assert [(i["pred"], i["judge"]) for i in items] == [(i["pred"], i["judge"]) for i in case["items"]]
    assert aggregate(items, compensated=case["compensated"]) == case["expected"]


def test_fixture_has_enough_official_cases():
    assert len(OFFICIAL["extract_cases"]) >= 10 and len(OFFICIAL["aggregate_cases"]) >= 10
    assert {c["compensated"] for c in OFFICIAL["aggregate_cases"]} == {False, True}


def test_empty_bucket_is_nan_not_a_crash():
    import math

    out = aggregate([{"difficulty": "easy", "length": "short", "judge": True, "pred": "A"}])
    assert out["overall"] == out["easy"] == out["short"] == 100.0
    assert all(math.isnan(out[k]) for k in ("hard", "medium", "long"))


# ------------------------------------------------------------------------------------------- report section
def test_report_section_is_result_py_per_setting():
    import pandas as pd

    rows = []
    for ratio, right in ((1.0, {"lbv2fix01", "lbv2fix02", "lbv2fix03"}), (0.5, {"lbv2fix01"})):
        for r in RECORDS:
            text = f"The correct answer is ({r['answer'] if r['_id'] in right else 'Z'})"
            rows.append({"model": "m", "method": "snapkv", "keep_ratio": ratio, "task": "longbench_v2/x",
                         "prediction": text, "score": float(r["_id"] in right), "failed": False,
                         "meta": {"difficulty": r["difficulty"], "length": r["length"], "prompt": "0shot"}})
    rows.append({**rows[0], "failed": True, "score": None, "prediction": None})
    rows.append({**rows[0], "task": "longbench/qasper"})
    text = report_section(pd.DataFrame(rows))
    # ratio 1.0: fix01 (easy, short), fix02 (hard, long), fix03 (easy, medium) right of 12; 6 easy, 6 hard
    assert "| m | snapkv | 1.0 | 0shot | 25.0 | 33.3 | 16.7 | 25.0 | 25.0 | 25.0 | 12.0 |" in text
    assert "| m | snapkv | 0.5 | 0shot | 8.3 | 16.7 | 0.0 | 25.0 | 0.0 | 0.0 | 12.0 |" in text
    assert report_section(pd.DataFrame(rows[-1:])) is None


# ------------------------------------------------------------------------------------------- end to end
def test_tiny_run_and_report(tmp_path, monkeypatch):
    import sys

    from hydra import compose, initialize_config_dir

    from harness import cli
    from harness.io import read_rows
    from harness.runner import run

    with initialize_config_dir(config_dir=str(CONF.parent.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "task=longbench_v2", f"task.data_dir={FIX}", "model=tiny-random", "context_length=800",
            "max_new_tokens=4", "keep_ratio=[0.5,1.0]", "method=snapkv", "progress=false"])
    run(cfg, tmp_path / "run")
    rows, _ = read_rows(tmp_path / "run" / "predictions.jsonl")
    assert len(rows) == 2 * len(RECORDS) and {r["sample_id"] for r in rows} == set(BY_ID)
    assert all(r["error"] is None and r["score"] in (0.0, 1.0) and r["query_aware"] is True for r in rows)
    assert all(r["context_tokens"] <= 800 and r["meta"]["prompt"] == "0shot" for r in rows)
    assert sum(r["meta"]["truncated"] for r in rows) == 2 * 3  # fix02, fix04, fix10 exceed 800 bytes
    for r in rows:
        assert r["score"] == float(judge(r["prediction"], BY_ID[r["sample_id"]]["answer"]))
    monkeypatch.setattr(sys, "argv", ["kvbench-report", str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    cli.report_main()
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## LongBench v2: accuracy (x100) as result.py reports it" in summary
    for ratio in (0.5, 1.0):
        acc = aggregate(predictions([r for r in rows if r["keep_ratio"] == ratio]))
        cells = " | ".join(f"{acc[c]:.1f}" for c in ("overall", "easy", "hard", "short", "medium", "long"))
        assert f"| tiny-random | snapkv | {ratio} | 0shot | {cells} | 12.0 |" in summary


BASE = ["model=tiny-random", "context_length=800", "max_new_tokens=2", "progress=false"]


@pytest.mark.parametrize("args, needle", [
    (["task.data_dir={empty}"], "LongBench v2 data file data.json not found in '{empty}'"),
    (["task.data_dir={bad}"], "record 3 (_id 'lbv2fix04') has no 'answer'"),
    (["task.data_dir={fix}", "task.cot=maybe"], "task.cot='maybe' is not allowed; allowed: true"),
    (["task.data_dir={fix}", "context_length=300"], "context_length=300 is too short for question 'lbv2fix01'"),
])
def test_bad_values_are_one_line(capsys, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    records = copy.deepcopy(RECORDS)
    records[3].pop("answer")
    _write(tmp_path / "bad", records)
    paths = {"empty": tmp_path / "empty", "bad": tmp_path / "bad", "fix": FIX}
    line = refused_in_process(capsys, "task=longbench_v2/single_doc_qa", *BASE, *[a.format(**paths) for a in args],
                              f"hydra.run.dir={tmp_path / 'run'}")
    assert needle.format(**paths) in line
    assert not (tmp_path / "run" / "predictions.jsonl").exists()
