"""benchmarks/hostile.py: its classifier, its data-loss check, its case generation, and a few real cases."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "hostile.py"


@pytest.fixture(scope="module")
def hostile():
    spec = importlib.util.spec_from_file_location("hostile", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hostile"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def outcome(hostile, text, rc=2, expect="error", command="kvbench", hung=False, lost=(), want=None,
            value=KeyError):
    case = hostile.Case("x", command, [], expect, want=want)
    return hostile.classify(case, rc, text, hung, list(lost), False, value)[0]


def test_classify_bad_cases(hostile):
    assert outcome(hostile, "kvbench: error: keep_ratio='abc' is not a number\n") == "clean"
    assert outcome(hostile, "usage: kvbench-report DIR\nkvbench-report: error: the following arguments are "
                            "required: dir\n", command="kvbench-report") == "clean"
    assert outcome(hostile, "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: x\n",
                   rc=1) == "traceback"
    hydra = "Could not override 'keep_ration'.\nKey 'keep_ration' is not in struct\n\n" \
            "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
    assert outcome(hostile, hydra, rc=1) == "traceback"
    assert outcome(hostile, "results: /tmp/run\n", rc=0) == "silent"
    assert outcome(hostile, "results: /tmp/run\n", rc=0, expect="either") == "ok"
    assert outcome(hostile, "kvbench: error: x\n", command="kvbench-train") == "unclean"  # another command's name
    assert outcome(hostile, "kvbench: error: x\n", rc=1) == "unclean"
    assert outcome(hostile, "kvbench: error: x\nkvbench: error: y\n") == "unclean"
    assert outcome(hostile, "kvbench: error: x\nValueError: y\n") == "unclean"
    assert outcome(hostile, "", rc=-9, hung=True) == "hang"
    assert outcome(hostile, "kvbench: error: x\n", lost=["run/predictions.jsonl changed"]) == "data lost"


def test_classify_good_cases(hostile):
    want = ("query_aware", True)
    assert outcome(hostile, "", rc=0, expect="ok", want=want, value=True) == "ok"
    assert outcome(hostile, "", rc=0, expect="ok", want=want, value="yes") == "silent-wrong"
    assert outcome(hostile, "", rc=0, expect="ok", want=want, value=1) == "silent-wrong"  # not a boolean
    assert outcome(hostile, "", rc=0, expect="ok", want=want) == "silent-wrong"  # nothing recorded
    assert outcome(hostile, "kvbench: error: query_aware='yes'\n", expect="ok") == "refused"


def test_lost_files(hostile, tmp_path):
    (tmp_path / "predictions.jsonl").write_bytes(b'{"a": 1}\n{"b": 2')  # a torn last line
    (tmp_path / "config.yaml").write_text("a: 1\n")
    before = hostile.snapshot(tmp_path)
    append = ("predictions.jsonl",)
    (tmp_path / "predictions.jsonl").write_bytes(b'{"a": 1}\n{"c": 3}\n')  # torn tail cut, a row appended
    assert hostile.lost_files(before, tmp_path, append) == []
    assert hostile.lost_files(before, tmp_path, ()) == ["predictions.jsonl changed"]
    (tmp_path / "predictions.jsonl").write_bytes(b'{"c": 3}\n')  # a whole row gone
    (tmp_path / "config.yaml").unlink()
    assert set(hostile.lost_files(before, tmp_path, append)) == {"predictions.jsonl changed", "config.yaml gone"}


def test_values_by_type(hostile):
    values = lambda path, *seen: [v for v, _, _ in hostile.bad_values(hostile.Key(path, list(seen)))]  # noqa: E731
    assert values("n_samples", 10) == ["abc", "1.5", "true", "''", "-1", "0"]
    assert "0" not in values("method.n_sink", 0, 4)  # 0 is a value the tree uses
    assert "2.0" in values("keep_ratio", 0.5, [0.1, 0.2]) and "[0.1,0.1]" in values("keep_ratio", 0.5, [0.1, 0.2])
    assert values("method.checkpoint", "harness/reference/lkv") == ["''", "{tmp}/nonexistent"]
    assert values("out", None) == ["''", "{tmp}/afile/sub"]
    assert set(values("query_aware", False)) == {"maybe", "2", "''"}
    assert [b for _, _, b in hostile.good_bools(0)] == [True, False]
    assert all(hostile.typo(n, i) != n for n in ("lr", "keep_ratio", "aa", "window") for i in range(2))


@pytest.fixture(scope="module")
def every_case(hostile):
    """The campaign's cases, made once (composing every config takes seconds): both tests below read them."""
    return hostile.all_cases()


def test_cases_cover_every_command(every_case):
    cases = every_case
    assert len(cases) >= 100
    assert len({c.id for c in cases}) == len(cases)
    commands = {c.command for c in cases}
    assert commands == {"kvbench", "kvbench-report", "kvbench-profile", "kvbench-train", "kvbench-reproduce",
                        "kvbench-train-reference"}
    ids = {c.id for c in cases}
    assert {"kvbench/group/method=nope", "kvbench/group/task=ruler/nope", "kvbench/hydra.run.dir="} <= ids
    assert any(i.startswith("kvbench/typo/method.") for i in ids)
    assert any(c.want == ("overwrite", False) for c in cases)  # a good spelling, checked in config.yaml


def test_a_few_real_cases(hostile, every_case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hostile, "all_cases", lambda: copy.deepcopy(every_case))  # main() selects from them
    out = tmp_path / "hostile.json"
    assert hostile.main(["--only", r"^kvbench-report/(nonexistent|a-file|no-args)$", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [c["id"] for c in report["cases"]] == ["kvbench-report/nonexistent", "kvbench-report/a-file",
                                                 "kvbench-report/no-args"]
    assert all(c["outcome"] in hostile.OUTCOMES for c in report["cases"])
    assert "machine:" in capsys.readouterr().out
