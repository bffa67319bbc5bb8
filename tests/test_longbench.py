"""LongBench tasks: registry, official data loading and errors, official prompts, pred.py middle truncation,
the context/question split, LongBench-E buckets, aggregation and the report section, configs, one tiny run."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from harness.errors import KvbenchError
from harness.tokenizer import byte_tokenizer
from tasks import expand, get_task
from tasks.base import PromptEncoder
from tasks.longbench import make_task
from tasks.longbench.aggregate import category_table, e_category_buckets, report_section
from tasks.longbench.config import DATA_ZIP_URL, DATASETS, E_DATASETS, MAX_NEW_TOKENS, PROMPTS
from tasks.longbench.prompt import build_prompt, context_end, middle_halves, truncate_middle
from tasks.longbench.task import select_indices

FIX = Path(__file__).parent / "fixtures" / "longbench"
CONF = Path(__file__).parent.parent / "conf" / "task"
SKIP = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}


@pytest.fixture(scope="module")
def enc():
    return PromptEncoder(byte_tokenizer())


def _records(name):
    return [json.loads(line) for line in (FIX / f"{name}.jsonl").read_text("utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ registry
def test_registry_and_class_attributes():
    assert expand("longbench") == [f"longbench/{d}" for d in DATASETS] and len(DATASETS) == 21
    assert expand("longbench_e") == [f"longbench_e/{d}" for d in E_DATASETS] and len(E_DATASETS) == 13
    for name in expand("longbench") + expand("longbench_e"):
        task = get_task(name, data_dir=None)
        dataset = name.split("/")[1]
        assert task.name == name
        assert type(task).skip_chat_template is (dataset in SKIP)
        assert task.info["dataset"] == dataset and task.info["suite"] == name.split("/")[0]
    with pytest.raises(KvbenchError, match="unknown task option"):
        get_task("longbench/qasper", data_dir=None, depth=3)
    with pytest.raises(KeyError):
        make_task("longbench_e/narrativeqa")


DEFAULTS = ["/task/longbench/_defaults@_global_", "_self_"]  # every LongBench config: all samples, query-aware


def test_configs_name_every_task():
    for suite, names in (("longbench", DATASETS), ("longbench_e", E_DATASETS)):
        import yaml

        assert yaml.safe_load((CONF / f"{suite}.yaml").read_text()) == {"defaults": DEFAULTS, "name": suite,
                                                                         "data_dir": None}
        files = sorted(p.stem for p in (CONF / suite).glob("*.yaml") if not p.name.startswith("_"))
        assert files == sorted(names)
        for d in names:
            assert yaml.safe_load((CONF / suite / f"{d}.yaml").read_text()) == {
                "defaults": DEFAULTS, "name": f"{suite}/{d}", "data_dir": None}


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent.resolve()), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("task", ["longbench/qasper", "longbench", "longbench_e/qasper", "longbench_e"])
def test_longbench_defaults_are_all_samples_query_aware(task):
    from harness.schema import validate

    cfg = _compose(f"task={task}")
    assert cfg.n_samples is None and cfg.query_aware is True and cfg.task.name == task
    assert validate(cfg).n_samples is None  # the schema takes null = all
    assert set(cfg.task) == {"name", "data_dir"}  # the run defaults are top-level keys, not task parameters
    off = _compose(f"task={task}", "query_aware=false", "n_samples=5")  # the command line still wins
    assert off.query_aware is False and off.n_samples == 5


def test_ruler_defaults_unchanged_and_ruler_refuses_all_samples():
    for task in ("ruler/niah_single_1", "ruler"):
        cfg = _compose(f"task={task}")
        assert cfg.n_samples == 10 and cfg.query_aware is False
    assert _compose().n_samples == 10 and _compose().query_aware is False
    assert _compose("paper=lkv_longbench").n_samples == 200  # a preset's count still beats the task's default
    with pytest.raises(KvbenchError, match="n_samples=null"):
        get_task("ruler/niah_single_1").samples(PromptEncoder(byte_tokenizer()), 1024, None, 0)


def test_all_samples_is_every_record(enc):
    task = make_task("longbench/qasper", data_dir=str(FIX))
    assert [s.sample_id for s in task.samples(enc, 1 << 16, None, 0)] == [r["_id"] for r in _records("qasper")]
    assert select_indices(5, None, 0, "x") == [0, 1, 2, 3, 4]


def test_run_name_carries_the_query_mode():
    from harness.cli import run_name

    assert run_name("task=longbench/qasper", True) == "query_aware=true,task=longbench.qasper"
    # the same config spelt out names the same dir (Hydra sorts the overrides)
    assert run_name("query_aware=true,task=longbench/qasper", True) == run_name("task=longbench/qasper", True)
    assert run_name("query_aware=false,task=longbench/qasper", False) == "query_aware=false,task=longbench.qasper"
    assert run_name("keep_ratio=[0.1,0.5],task=longbench", "true") == "keep_ratio=[0.1,0.5],query_aware=true,task=longbench"
    # query-agnostic (the top-level default, RULER's): names as before
    assert run_name("method=snapkv,task=ruler/vt", False) == "method=snapkv,task=ruler.vt"
    assert run_name("", False) == "defaults" and run_name("", True) == "query_aware=true"


# ------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("dataset", DATASETS)
def test_untruncated_prompt_is_official_and_split_after_documents(enc, dataset):
    task = make_task(f"longbench/{dataset}", data_dir=str(FIX))
    records = _records(dataset)
    samples = task.samples(enc, 1 << 16, 10, seed=0)
    assert len(samples) == len(records) == 3
    for s, r in zip(samples, records):
        official = PROMPTS[dataset].format(**r)  # pred.py: prompt_format.format(**json_obj)
        assert s.context + s.question + s.answer_prefix == official
        assert s.context.endswith(r["context"]) and len(s.context) == context_end(dataset, r["context"])
        assert not s.meta["truncated"] and s.sample_id == r["_id"]
        assert s.max_new_tokens == MAX_NEW_TOKENS[dataset]
        assert s.answers == r["answers"] and s.meta["all_classes"] == r["all_classes"]
        assert "length_bucket" not in s.meta
        assert s.meta["prompt_tokens"] == enc.count(s.context, s.question) == s.meta["official_prompt_tokens"]


def test_middle_halves_is_pred_py():
    ids = list(range(10))
    assert middle_halves(ids, 6) == ([0, 1, 2], [7, 8, 9])
    assert middle_halves(ids, 7) == ([0, 1, 2], [7, 8, 9])  # half = int(7 / 2)
    with pytest.raises(KvbenchError):
        middle_halves(ids, 1)  # pred.py would keep ids[-0:] = everything


def test_truncate_middle_keeps_exactly_first_and_last_halves():
    tok = byte_tokenizer()
    text = "".join(chr(ord("a") + i % 26) for i in range(101))
    assert truncate_middle(text, tok, 102) == text  # 101 bytes + BOS fit
    out = truncate_middle(text, tok, 40)
    ids = tok(text).input_ids  # [BOS] + bytes: the BOS is part of the first half, then skipped on decode
    assert out == tok.decode(ids[:20], skip_special_tokens=True) + tok.decode(ids[-20:], skip_special_tokens=True)
    assert out == text[:19] + text[-20:]
    assert len(tok(out).input_ids) == 40


@pytest.mark.parametrize("dataset", DATASETS)
def test_truncated_prompt_fits_and_split_keeps_the_question(enc, dataset):
    tok = enc.tokenizer
    task = make_task(f"longbench/{dataset}", data_dir=str(FIX))
    L = 700
    for s, r in zip(task.samples(enc, L, 3, seed=0), _records(dataset)):
        official = build_prompt(dataset, r["context"], r["input"])
        budget = s.meta["truncation_budget"]
        assert s.context + s.question == truncate_middle(official, tok, budget)
        if r["language"] != "zh":
            assert budget == L  # exactly pred.py's truncation at max_length = context_length
        else:  # a cut inside a UTF-8 character decodes to U+FFFD (3 bytes): the budget shrank to fit
            assert budget <= L
        n = enc.count(s.context, s.question)
        assert n <= L and s.meta["prompt_tokens"] == n
        assert s.meta["truncated"] == (len(tok(official).input_ids) > L)
        if s.meta["truncated"]:
            after = official[context_end(dataset, r["context"]):]
            tail = tok.decode(tok(official).input_ids[-(budget // 2):])
            if len(after.encode()) <= budget // 2:  # the question survived: split right before it
                assert s.question == after
            else:  # the cut fell inside the question: the documents' end is gone, split at the cut
                assert s.question == tail
            assert s.context.startswith(official[:50])


def test_chat_template_comes_off_the_budget(enc):
    tok = copy.deepcopy(byte_tokenizer())
    tok.chat_template = "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n"
    chat = PromptEncoder(tok, chat=True)
    task = make_task("longbench/qasper", data_dir=str(FIX))
    L = 600
    for s in task.samples(chat, L, 3, seed=0):
        assert chat.count(s.context, s.question) <= L
    overhead = chat.count("", "") - 1
    s = task.samples(chat, L, 3, seed=0)[1]
    assert s.meta["truncated"] and s.meta["truncation_budget"] == L - overhead
    with pytest.raises(KvbenchError, match="too small"):
        task.samples(chat, overhead + 1, 1, seed=0)


def test_selection_is_seeded_and_capped():
    assert select_indices(3, 5, 0, "x") == [0, 1, 2]
    a = select_indices(200, 10, 1, "longbench/qasper")
    assert a == select_indices(200, 10, 1, "longbench/qasper") and a == sorted(a) and len(set(a)) == 10
    assert a != select_indices(200, 10, 2, "longbench/qasper")


@pytest.mark.parametrize("dataset", E_DATASETS)
def test_longbench_e_files_and_buckets(enc, dataset):
    task = make_task(f"longbench_e/{dataset}", data_dir=str(FIX))
    samples = task.samples(enc, 1 << 16, 3, seed=0)
    assert [s.meta["length_bucket"] for s in samples] == ["0-4k", "4-8k", "8k+"]
    assert [s.sample_id for s in samples] == [r["_id"] for r in _records(f"{dataset}_e")]


def test_task_score_uses_sample_meta(enc):
    trec = make_task("longbench/trec", data_dir=str(FIX))
    s = trec.samples(enc, 1 << 16, 1, seed=0)[0]
    assert s.meta["all_classes"]
    assert trec.score(f"\n{s.answers[0]}\nCity", s) == 1.0
    assert trec.score("Food", s) == 0.0
    lcc = make_task("longbench/lcc", data_dir=str(FIX))
    s = lcc.samples(enc, 1 << 16, 1, seed=0)[0]
    assert lcc.score("# the loop\n" + s.answers[0].strip(), s) == pytest.approx(
        __import__("fuzzywuzzy.fuzz", fromlist=["ratio"]).ratio(s.answers[0].strip(), s.answers[0]) / 100)


# ------------------------------------------------------------------------------------------------ errors
def test_offline_without_data_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KvbenchError) as err:
        make_task("longbench_e/qasper").samples(PromptEncoder(byte_tokenizer()), 512, 1, 0)
    msg = str(err.value)
    assert "\n" not in msg and "qasper_e.jsonl" in msg and DATA_ZIP_URL in msg


def test_missing_file_and_malformed_lines(tmp_path, enc):
    with pytest.raises(KvbenchError) as err:
        make_task("longbench/qasper", data_dir=str(tmp_path)).samples(enc, 512, 1, 0)
    assert str(tmp_path / "qasper.jsonl") in str(err.value) and "\n" not in str(err.value)
    good = (FIX / "qasper.jsonl").read_text("utf-8").splitlines()
    (tmp_path / "qasper.jsonl").write_text(good[0] + "\n\n" + '{"input": "q", "context": \n', "utf-8")
    with pytest.raises(KvbenchError) as err:
        make_task("longbench/qasper", data_dir=str(tmp_path)).samples(enc, 512, 1, 0)
    assert f"{tmp_path / 'qasper.jsonl'}:3" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "hotpotqa.jsonl").write_text(good[0] + "\n" + json.dumps({"input": "q", "context": "c"}) + "\n")
    with pytest.raises(KvbenchError, match=r"hotpotqa.jsonl:2: .*answers"):
        make_task("longbench/hotpotqa", data_dir=str(tmp_path)).samples(enc, 512, 1, 0)


def test_hub_path_when_online(monkeypatch, tmp_path, enc):
    """No network is used: datasets.load_dataset and hf_hub_download are replaced."""
    import zipfile

    import datasets
    import huggingface_hub

    from tasks.longbench import data

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def fake_load(repo, name, split):
        calls.append((repo, name, split))
        return _records(name)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    s = make_task("longbench_e/trec").samples(enc, 1 << 16, 1, 0)
    assert calls == [("THUDM/LongBench", "trec_e", "test")] and s[0].meta["length_bucket"] == "0-4k"

    def broken_load(*a, **k):
        raise RuntimeError("Dataset scripts are no longer supported, but found LongBench.py\nmore")

    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("data/lcc.jsonl", (FIX / "lcc.jsonl").read_text("utf-8"))
    monkeypatch.setattr(datasets, "load_dataset", broken_load)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, repo_type: str(zpath))
    data._zip_records.cache_clear()
    assert [x.sample_id for x in make_task("longbench/lcc").samples(enc, 1 << 16, 3, 0)] == \
        [r["_id"] for r in _records("lcc")]
    with pytest.raises(KvbenchError) as err:  # not in the zip: both reasons on one line
        make_task("longbench/qasper").samples(enc, 1 << 16, 1, 0)
    msg = str(err.value)
    assert "\n" not in msg and "no longer supported" in msg and "qasper" in msg and DATA_ZIP_URL in msg
    data._zip_records.cache_clear()


# ------------------------------------------------------------------------------------------- aggregation
# README.md (LongBench/), GPT-3.5-Turbo-16k: per-dataset scores and the English / Chinese leaderboards.
GPT35 = {"narrativeqa": 23.6, "qasper": 43.3, "multifieldqa_en": 52.3, "multifieldqa_zh": 61.2, "hotpotqa": 51.6,
         "2wikimqa": 37.7, "musique": 26.9, "dureader": 28.7, "gov_report": 29.5, "qmsum": 23.4, "multi_news": 26.7,
         "vcsum": 16.0, "trec": 68.0, "triviaqa": 91.4, "samsum": 41.7, "lsht": 29.2, "passage_count": 4.5,
         "passage_retrieval_en": 71.0, "passage_retrieval_zh": 77.5, "lcc": 54.7, "repobench-p": 53.6}
README_EN = {"Avg": 44.0, "Single-Doc QA": 39.8, "Multi-Doc QA": 38.7, "Summarization": 26.5,
             "Few-shot Learning": 67.1, "Code Completion": 54.1, "Synthetic Tasks": 37.8}
README_ZH = {"Avg": 44.5, "Single-Doc QA": 61.2, "Multi-Doc QA": 28.7, "Summarization": 16.0,
             "Few-shot Learning": 29.2, "Code Completion": 54.1, "Synthetic Tasks": 77.5}


def test_category_table_reproduces_readme_leaderboards():
    for lang, want in (("en", README_EN), ("zh", README_ZH)):
        got = category_table(GPT35, language=lang)
        assert set(got) == set(want)
        for k, v in want.items():
            assert abs(got[k] - v) <= 0.1, (lang, k)  # README rounds from unrounded per-dataset scores
    allc = category_table({f"longbench/{k}": v for k, v in GPT35.items()})
    assert allc["Single-Doc QA"] == pytest.approx((23.6 + 43.3 + 52.3 + 61.2) / 4)
    assert allc["Avg"] == pytest.approx(sum(v for k, v in allc.items() if k != "Avg") / 6)
    assert category_table({"trec": 50.0, "lcc": 30.0}) == {"Few-shot Learning": 50.0, "Code Completion": 30.0,
                                                           "Avg": 40.0}


def test_e_category_buckets():
    table = {"qasper": {"0-4k": 10.0, "4-8k": 20.0, "8k+": float("nan")},
             "hotpotqa": {"0-4k": 30.0, "4-8k": 40.0, "8k+": 50.0}}
    out = e_category_buckets(table)
    assert out["Single-Doc QA"]["0-4k"] == 10.0 and out["Multi-Doc QA"]["8k+"] == 50.0
    assert out["All"] == {"0-4k": 20.0, "4-8k": 30.0, "8k+": 50.0}


def test_report_section():
    import pandas as pd

    rows = []
    for name in ("longbench/qasper", "longbench/trec", "longbench_e/qasper", "ruler/vt"):
        for i, (score, length) in enumerate([(1.0, 1000), (0.5, 5000), (0.0, 9000)]):
            rows.append({"model": "m", "method": "full", "keep_ratio": 1.0, "task": name, "score": score,
                         "meta": {"length": length}, "failed": False})
    text = report_section(pd.DataFrame(rows))
    assert "README averages" in text and "LongBench-E" in text
    assert "| m | full | 1.0 | 50.0 |" in text  # single-doc = qasper = 50.0
    assert report_section(pd.DataFrame(rows[-3:])) is None


# ------------------------------------------------------------------------------------------- end to end
def test_tiny_run_through_the_harness(tmp_path):
    from hydra import compose, initialize_config_dir

    from harness.runner import run

    with initialize_config_dir(config_dir=str(CONF.parent.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "task=longbench/trec", f"task.data_dir={FIX}", "n_samples=2", "context_length=400",
            "max_new_tokens=3", "keep_ratio=0.5", "method=full", "progress=false"])
    run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["error"] is None and 0.0 <= r["score"] <= 1.0 for r in rows)
    assert all(r["meta"]["all_classes"] and r["context_tokens"] <= 400 for r in rows)


def test_cli_run_dir_and_rows_carry_the_query_mode(tmp_path):
    """``kvbench task=longbench/...``: every sample, query-aware, and both the run dir and the rows say so
    (``query_aware=false`` is one override away: test_longbench_defaults_are_all_samples_query_aware)."""
    import os
    import shutil
    import subprocess
    import sys

    (tmp_path / "data").mkdir()
    shutil.copy(FIX / "trec.jsonl", tmp_path / "data" / "trec.jsonl")
    args = ["context_length=400", "max_new_tokens=2", "model=tiny-random", "task.data_dir=data", "task=longbench/trec"]
    r = subprocess.run([sys.executable, "-m", "harness.cli", *args, "progress=false"], cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "results" / "runs" / ",".join(sorted([*args, "query_aware=true"])).replace("/", ".")
    rows = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(_records("trec")) and all(r["query_aware"] is True for r in rows)
