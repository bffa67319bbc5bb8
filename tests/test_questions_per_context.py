"""Several questions per context (``questions_per_context=K``) and samples of several lengths in one run.

A context is prefilled and compressed once and each question answered from its own copy of the pruned cache; the
answers must equal one query-agnostic run per question (the same context, the question after compression).
"""
from __future__ import annotations

import pytest

import harness.pipeline as pipeline
from harness.errors import KvbenchError
from harness.io import read_rows
from harness.overrides import Composer
from harness.runner import run
from tasks.base import PromptEncoder, Sample, Task
from tests.conftest import refused_in_process
from tests.test_every_config import CONF


def compose(*overrides):
    with Composer(CONF, "config") as composer:
        return composer.compose(list(overrides))


@pytest.fixture(scope="module")
def tiny():
    from harness.models import load_model

    model, tokenizer = load_model(compose("model=tiny-random").model)
    return model, tokenizer


def test_a_multikey_context_carries_one_question_per_hidden_key(tiny):
    from tasks.ruler import make_task

    _, tokenizer = tiny
    task = make_task("niah_multikey_1")
    enc = PromptEncoder(tokenizer)
    samples = task.question_samples(enc, 1024, 2, 4, seed=3)
    assert len(samples) == 8
    for c in range(2):
        group = samples[4 * c:4 * c + 4]
        assert len({s.context for s in group}) == 1  # one context, byte for byte
        assert [s.meta["question_index"] for s in group] == [0, 1, 2, 3]
        assert {s.meta["context_id"] for s in group} == {group[0].sample_id.rsplit("/q", 1)[0]}
        keys = [s.meta["queries"] for s in group]
        assert all(len(k) == 1 for k in keys) and len({k[0] for k in keys}) == 4  # each asks its own key
        for s in group:
            # the answer is the value of the asked key, and its evidence span lies on that value in the context
            assert len(s.answers) == 1 and s.answers[0] in s.context
            (b, e), = s.meta["evidence"]
            assert s.context[b:e] == s.answers[0]
            assert f"for {s.meta['queries'][0]} is: {s.answers[0]}" in s.context
            assert enc.count_sample(s) + task.max_new_tokens <= 1024  # RULER's rule holds for every question


def test_one_question_per_context_leaves_the_official_stream_unchanged(tiny):
    from tasks.ruler import make_task

    _, tokenizer = tiny
    enc = PromptEncoder(tokenizer)
    task = make_task("niah_multikey_1")
    a = task.samples(enc, 1024, 2, seed=5)
    b = make_task("niah_multikey_1").samples(enc, 1024, 2, seed=5)
    assert [(s.context, s.question, s.answers) for s in a] == [(s.context, s.question, s.answers) for s in b]
    assert all(not s.more_questions and "context_id" not in s.meta for s in a)


def test_multiquery_asks_its_four_keys_one_question_each(tiny):
    from tasks.ruler import make_task

    _, tokenizer = tiny
    task = make_task("niah_multiquery")
    assert task.max_questions_per_context() == 4
    samples = task.question_samples(PromptEncoder(tokenizer), 1024, 1, 2, seed=0)
    # 4 keys over 2 questions: two keys each, all four asked once
    assert [len(s.meta["queries"]) for s in samples] == [2, 2]
    assert len({k for s in samples for k in s.meta["queries"]}) == 4
    with pytest.raises(KvbenchError, match="at most 4"):
        task.question_samples(PromptEncoder(tokenizer), 1024, 1, 5, seed=0)


@pytest.mark.parametrize("method, extra", [("snapkv", []), ("streaming_llm", []),
                                           ("knorm", ["method.prefill_chunk=256"])])
def test_one_prefill_per_context_and_the_answers_of_separate_runs(tmp_path, monkeypatch, tiny, method, extra):
    from harness.attention import install
    from harness.models import load_model
    import methods

    calls = {"prefill": 0, "chunked": 0}
    real_prefill, real_chunked = pipeline.prefill, pipeline.chunked_prefill

    def counted(*a, **k):
        calls["prefill"] += 1
        return real_prefill(*a, **k)

    def counted_chunked(*a, **k):
        calls["chunked"] += 1
        return real_chunked(*a, **k)

    monkeypatch.setattr(pipeline, "prefill", counted)
    monkeypatch.setattr(pipeline, "chunked_prefill", counted_chunked)
    cfg = compose(f"method={method}", *extra, "model=tiny-random", "task=ruler/niah_multiquery", "context_length=1024",
                  "n_samples=2", "keep_ratio=[0.25,0.5]", "max_new_tokens=6", "questions_per_context=4",
                  "progress=false")
    run(cfg, tmp_path)
    rows = read_rows(tmp_path / "predictions.jsonl")[0]
    assert len(rows) == 2 * 4 * 2
    m = methods.build_method(cfg.method)
    if m.prefill_chunk is None:
        # one prefill per context, shared by its 4 questions and (the method shares scores) both ratios
        assert calls == {"prefill": 2, "chunked": 0}
    else:
        assert calls == {"prefill": 0, "chunked": 2 * 2}  # a chunked prefill is per ratio, still not per question
    assert {r["questions_per_context"] for r in rows} == {4}
    assert sorted({(r["context_id"], r["question_index"]) for r in rows}) == sorted(
        {(r["sample_id"].rsplit("/q", 1)[0], int(r["sample_id"].rsplit("/q", 1)[1])) for r in rows})

    # the same questions run one by one, query-agnostic, on a fresh model: the same predictions
    model, tokenizer = load_model(cfg.model)
    from tasks.ruler import make_task

    task = make_task("niah_multiquery")
    enc = PromptEncoder(tokenizer)
    by_key = {(r["sample_id"], r["keep_ratio"]): r for r in rows}
    with install(model) as hooks:
        for s in task.question_samples(enc, 1024, 2, 4, seed=0):
            ctx, q = enc.encode_sample(s)
            alone = pipeline.run_sample(model, tokenizer, hooks, methods.build_method(cfg.method), ctx, q,
                                        [0.25, 0.5], False, 6, task.stop_strings(), seed=0)
            for o in alone:
                row = by_key[(s.sample_id, o.keep_ratio)]
                assert row["prediction"] == o.prediction
                assert row["kept_tokens"] == o.kept_tokens and row["kv_bytes"] == o.kv_bytes


def test_an_interrupted_context_resumes_only_its_missing_questions(tmp_path):
    args = ["method=snapkv", "model=tiny-random", "task=ruler/niah_multikey_1", "context_length=1024", "n_samples=1",
            "keep_ratio=0.5", "max_new_tokens=4", "questions_per_context=3", "progress=false"]
    run(compose(*args), tmp_path)
    path = tmp_path / "predictions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    path.write_text("".join(lines[:2]))  # the third question's row lost
    run(compose(*args), tmp_path)
    rows = read_rows(path)[0]
    assert [r["question_index"] for r in rows] == [0, 1, 2]
    assert path.read_text().splitlines(keepends=True)[:2] == lines[:2]


@pytest.mark.parametrize("args, needle", [
    (["task=ruler/niah_multiquery", "questions_per_context=4", "query_aware=true"], "query_aware=false"),
    (["task=ruler/niah_multiquery", "questions_per_context=5"], "allowed: 1..4"),
    (["task=ruler/niah_single_1", "questions_per_context=2"], "allowed: 1..1"),
    (["task=ruler/vt", "questions_per_context=2"], "ruler/vt"),
    (["task=infinitebench/passkey", "questions_per_context=2"], "one question each"),
    (["method=pyramidinfer", "method.rerotate_keys=true"], "different count per layer"),
    (["method=fastkv", "method.scorer.tsp_ratio=0.1", "method.rerotate_keys=true", "keep_ratio=0.5"],
     "keep_ratio=0.5"),
    (["method=fastkv", "method.allocator=cake"], "leaves them unscored"),
    (["method=asl", "method.allocator=headkv"], "leaves them unscored"),
    (["task=ruler/niah_multiquery", "questions_per_context=0"], "questions_per_context=0"),
    (["task=ruler/niah_multiquery", "questions_per_context=two"], "questions_per_context='two'"),
])
def test_bad_questions_per_context_is_one_line(capsys, tmp_path, args, needle):
    line = refused_in_process(capsys, "model=tiny-random", *args, f"hydra.run.dir={tmp_path}/run")
    assert needle in line
    assert not (tmp_path / "run").exists()


class Records(Task):
    """A finite task whose records share contexts (as several LongBench questions about one document)."""

    name = "test/records"
    finite = True

    def samples(self, encoder, context_length, n_samples, seed):
        docs = ["alpha beta gamma. " * 20, "delta epsilon. " * 25]
        out = [Sample(f"r{i}", docs[i % 2], f" Question {i}?", [str(i)], meta={"record": i}) for i in range(5)]
        return out[:n_samples] if n_samples is not None else out

    def score(self, prediction, sample):
        return 0.0


def test_a_finite_task_groups_its_records_by_context():
    groups = Records().question_samples(encoder=None, context_length=512, n_contexts=None, questions=2, seed=0)
    assert [(s.sample_id, s.meta["context_id"], s.meta["question_index"]) for s in groups] == [
        ("r0", "r0", 0), ("r2", "r0", 1), ("r1", "r1", 0), ("r3", "r1", 1)]  # r4: a third question of r0's context
    picked = {seed: [s.sample_id for s in Records().question_samples(None, 512, 1, 3, seed)] for seed in range(8)}
    assert set(map(tuple, picked.values())) == {("r0", "r2", "r4"), ("r1", "r3")}  # the seed picks the context
    assert picked == {seed: [s.sample_id for s in Records().question_samples(None, 512, 1, 3, seed)]
                      for seed in range(8)}  # and the same seed the same one


class TwoLengths(Task):
    """Samples built for two lengths in one run (a NIAH length grid): each row records its sample's length."""

    name = "test/two_lengths"

    def samples(self, encoder, context_length, n_samples, seed):
        return [Sample(f"L{n}", "word " * (n // 8), " Which word?", ["word"], max_new_tokens=2,
                       meta={"context_length": n}) for n in (128, 256)]

    def score(self, prediction, sample):
        return 1.0


def test_each_row_records_the_length_its_sample_was_built_for(tmp_path, monkeypatch):
    import tasks

    monkeypatch.setitem(tasks._REGISTRY, "test/two_lengths", lambda **kw: TwoLengths(**kw))
    cfg = compose("model=tiny-random", "task=ruler/niah_single_1", "context_length=512", "n_samples=1",
                  "progress=false")
    cfg.task = {"name": "test/two_lengths", "data_dir": None}
    run(cfg, tmp_path)
    rows = read_rows(tmp_path / "predictions.jsonl")[0]
    assert {r["sample_id"]: r["context_length"] for r in rows} == {"L128": 128, "L256": 256}
    assert all(r["context_tokens"] <= r["context_length"] for r in rows)


def test_a_sample_longer_than_its_own_length_is_refused(tmp_path, monkeypatch):
    import tasks

    class Overfull(TwoLengths):
        def samples(self, encoder, context_length, n_samples, seed):
            return [Sample("big", "word " * 400, " ?", ["w"], meta={"context_length": 128})]

    monkeypatch.setitem(tasks._REGISTRY, "test/two_lengths", lambda **kw: Overfull(**kw))
    cfg = compose("model=tiny-random", "context_length=2048", "n_samples=1", "progress=false")
    cfg.task = {"name": "test/two_lengths", "data_dir": None}
    with pytest.raises(KvbenchError, match="context_length=128 is smaller than the prompt"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before writing: no empty run dir left behind
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(KvbenchError):
        run(cfg, tmp_path / "kept")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]  # a dir with files stays as it was


def test_longbench_questions_about_one_document_share_its_truncated_context(tmp_path, tiny):
    import json

    from tasks.longbench.task import task_class

    _, tokenizer = tiny
    doc = " ".join(f"Sentence {i} of the paper says the value is {i * 7}." for i in range(300))
    records = [{"input": q, "context": c, "answers": [a], "length": 3000, "dataset": "qasper", "language": "en",
                "all_classes": None, "_id": f"id{i}"}
               for i, (q, c, a) in enumerate([("What is the value of sentence 3?", doc, "21"),
                                              ("Another paper?", "A short other paper.", "no"),
                                              ("And what is the value said by sentence 299, at the very end?", doc,
                                               "2093")])]
    (tmp_path / "qasper.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    task = task_class("qasper")(data_dir=str(tmp_path))
    enc = PromptEncoder(tokenizer)
    samples = task.question_samples(enc, 512, None, 4, seed=0)
    assert [(s.sample_id, s.meta["context_id"], s.meta["question_index"]) for s in samples] == [
        ("id0", "id0", 0), ("id2", "id0", 1), ("id1", "id1", 0)]
    a, b = samples[0], samples[1]
    assert a.context == b.context and a.meta["truncated"]  # one truncated document for both questions
    assert a.question != b.question and b.question.rstrip().endswith("Answer:")
    assert all(enc.count_sample(s) <= 512 for s in samples)
    # the document is the one of the longest question's truncation: nothing longer than needed is cut
    alone = task.build_sample(enc, records[2], 2, 512)
    assert a.context == alone.context
