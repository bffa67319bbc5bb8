"""task=ruler_kvpress: kvpress's RULER data read from local files in the Hub config's layout
(tests/fixtures/kvpress_ruler/4096/test-00000-of-00001.jsonl, written for these tests: 3 niah_single_1, 2 vt and
2 qa_1 rows with kvpress's columns; the parquet variant is made from it here)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.errors import KvbenchError
from tasks.base import PromptEncoder

FIXTURE = Path(__file__).parent / "fixtures" / "kvpress_ruler"
CONF = Path(__file__).resolve().parent.parent / "conf"


def rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / "4096" / "test-00000-of-00001.jsonl").read_text().splitlines()]


def test_suite_registers_the_13_tasks():
    import tasks

    names = tasks.expand("ruler_kvpress")
    assert len(names) == 13 and names[0] == "ruler_kvpress/niah_single_1" and names[-1] == "ruler_kvpress/qa_2"


def test_samples_are_the_rows_in_file_order():
    import tasks

    task = tasks.get_task("ruler_kvpress/niah_single_1", data_dir=str(FIXTURE / "4096"))
    enc = PromptEncoder(tokenizer=None, chat=False)
    samples = task.samples(enc, 4096, None, seed=0)
    want = [r for r in rows() if r["task"] == "niah_single_1"]
    assert len(samples) == 3
    for s, r in zip(samples, want):
        assert (s.context, s.answer_prefix, s.answers, s.max_new_tokens) == (
            r["context"], r["answer_prefix"], r["answer"], 128)
        assert s.question == r["question"] + "\n"  # kvpress's question suffix without a chat template
    assert [s.sample_id for s in task.samples(enc, 4096, 2, seed=7)] == ["niah_single_1-0", "niah_single_1-1"]
    chat = task.samples(PromptEncoder(tokenizer=None, chat=True), 4096, 1, seed=0)[0]
    assert chat.question == want[0]["question"]  # with a template, the template ends the question


def test_parquet_and_dataset_root(tmp_path):
    """The Hub layout: <root>/4096/test-00000-of-00001.parquet; data_dir may be the root (context_length picks
    the sub-directory) or the config's directory."""
    import pandas as pd

    import tasks

    (tmp_path / "4096").mkdir()
    pd.DataFrame(rows()).to_parquet(tmp_path / "4096" / "test-00000-of-00001.parquet")
    enc = PromptEncoder(tokenizer=None, chat=False)
    for data_dir in (tmp_path, tmp_path / "4096"):
        task = tasks.get_task("ruler_kvpress/vt", data_dir=str(data_dir))
        got = task.samples(enc, 4096, None, seed=0)
        assert [s.answers for s in got] == [["XKQ", "QQA"], ["PLM", "QQA"]]
        assert all(isinstance(a, str) for s in got for a in s.answers) and got[0].max_new_tokens == 30


def test_score_is_rulers_metric_after_kvpress_postprocessing():
    import tasks

    niah = tasks.get_task("ruler_kvpress/niah_single_1", data_dir=str(FIXTURE / "4096"))
    qa = tasks.get_task("ruler_kvpress/qa_1", data_dir=str(FIXTURE / "4096"))
    vt = tasks.get_task("ruler_kvpress/vt", data_dir=str(FIXTURE / "4096"))
    enc = PromptEncoder(tokenizer=None, chat=False)
    s_niah = niah.samples(enc, 4096, 1, 0)[0]
    s_qa = qa.samples(enc, 4096, 1, 0)[0]
    s_vt = vt.samples(enc, 4096, 1, 0)[0]
    assert niah.score(" 4183920.", s_niah) == 1.0
    assert niah.score(" 4183\n920", s_niah) == 1.0  # kvpress deletes control characters (RULER's: a newline)
    assert qa.score(" Blue", s_qa) == 1.0  # qa: string_match_part, any answer
    assert vt.score(" XKQ, and more", s_vt) == 0.5  # others: string_match_all, the share of answers found


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r.pop("answer_prefix"), "lacks answer_prefix"),
    (lambda r: r.update(answer=[]), "answer must be a non-empty list of strings"),
    (lambda r: r.update(max_new_tokens=0), "max_new_tokens is 0"),
    (lambda r: r.update(context=3), "context is a int"),
])
def test_bad_rows_are_refused(tmp_path, mutate, needle):
    import tasks

    data = rows()
    mutate(data[0])
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in data) + "\n")
    task = tasks.get_task("ruler_kvpress/niah_single_1", data_dir=str(tmp_path))
    with pytest.raises(KvbenchError) as err:
        task.samples(PromptEncoder(tokenizer=None), 4096, 1, 0)
    assert needle in str(err.value) and "data.jsonl row 1" in str(err.value) and "\n" not in str(err.value)


def test_missing_data_is_one_line(tmp_path):
    import tasks

    enc = PromptEncoder(tokenizer=None)
    with pytest.raises(KvbenchError, match="nothing is downloaded"):
        tasks.get_task("ruler_kvpress/vt").samples(enc, 4096, 1, 0)
    with pytest.raises(KvbenchError, match="holds no \\*.parquet or \\*.jsonl"):
        tasks.get_task("ruler_kvpress/vt", data_dir=str(tmp_path)).samples(enc, 4096, 1, 0)
    shutil.copytree(FIXTURE / "4096", tmp_path / "d")
    with pytest.raises(KvbenchError, match=r"has no row of task 'cwe'; leave it out with task.exclude=\[cwe\]"):
        tasks.get_task("ruler_kvpress/cwe", data_dir=str(tmp_path / "d")).samples(enc, 4096, 1, 0)
    (tmp_path / "d" / "broken.jsonl").write_text("{not json}\n")
    with pytest.raises(KvbenchError, match="broken.jsonl: line 1 is not valid JSON"):
        tasks.get_task("ruler_kvpress/vt", data_dir=str(tmp_path / "d")).samples(enc, 4096, 1, 0)


class ChatTokenizer:
    """A chat template of the Llama-3 shape, enough to compare prompt layouts as text."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs):
        text = "<|begin|>" + "".join(f"<|{m['role']}|>\n\n{m['content']}<|eot|>" for m in messages)
        return text + ("<|assistant|>\n\n" if add_generation_prompt else "")


def kvpress_layout(tokenizer, context: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """kvpress/pipeline.py preprocess (kvpress 8bb29b9): the context part and the question part, as text."""
    separator = "#" * (len(context) + 10)
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}],
                                         add_generation_prompt=True, tokenize=False)
    context, question_suffix = text.split(separator)
    return context, question + question_suffix + answer_prefix


def test_prompt_layout_is_kvpress():
    import tasks

    tok = ChatTokenizer()
    enc = PromptEncoder(tok, chat=True)
    for name in ("niah_single_1", "vt", "qa_1"):
        task = tasks.get_task(f"ruler_kvpress/{name}", data_dir=str(FIXTURE / "4096"))
        for s in task.samples(enc, 4096, None, 0):
            assert enc._wrap(s.context, s.question, s.answer_prefix) == kvpress_layout(
                tok, s.context, s.question, s.answer_prefix)


def test_task_config_composes_and_reaches_the_leaderboard_cells():
    """task=ruler_kvpress composes (data_dir passed through); the kvpress preset compares its rows with the
    leaderboard's ruler cells (paper.task_aliases)."""
    import pandas as pd
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from harness.published import side_by_side
    from harness.runner import suite_tasks, task_params

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["paper=kvpress_ruler4k", "task=ruler_kvpress",
                                           f"task.data_dir={FIXTURE / '4096'}", "task.exclude=[qa_2]"])
    GlobalHydra.instance().clear()
    assert len(suite_tasks(cfg.task)) == 12 and task_params(cfg.task) == {"data_dir": str(FIXTURE / "4096")}
    paper = OmegaConf.to_container(cfg.paper)
    df = pd.DataFrame([{"model": "Llama-3.1-8B-Instruct", "method": "snapkv", "keep_ratio": 0.75, "score": s,
                        "task": f"ruler_kvpress/{t}", "failed": False, "paper": "kvpress_ruler4k"}
                       for t, s in (("vt", 1.0), ("qa_1", 0.5))])
    cell = side_by_side(df, paper).query("method == 'snapkv' and keep_ratio == 0.75").iloc[0]
    assert (cell.ours, cell.tasks, cell.published, bool(cell.approximate)) == (75.0, 2, 80.3, True)
