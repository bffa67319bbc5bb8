"""scripts/reference_check.py: its refusals, the task lists it runs, and how it aggregates rows (no model run)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reference_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("reference_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, named", [
    (["--seed", "1000000"], "--seed=1000000"), (["--seed", "-1"], "--seed=-1"), (["--n", "0"], "--n=0"),
    (["--threads", "0"], "--threads=0"), (["--ratios", "0.1,1.5"], "1.5"), (["--ratios", "a"], "--ratios='a'"),
    (["--ea-tasks", "qa_1"], "'qa_1'"), (["--model-path", "/nonexistent/dir"], "--model-path='/nonexistent/dir'"),
])
def test_bad_arguments_are_refused_in_one_line(check, capsys, args, named):
    with pytest.raises(SystemExit) as info:
        check.main(args)
    assert info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: ") and named in lines[0], lines


def test_a_non_empty_out_dir_is_refused(check, capsys, tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit) as info:
        check.main(["--out", str(tmp_path)])
    assert info.value.code == 2 and "is not empty" in capsys.readouterr().err


def test_the_offline_suite_is_ruler_without_its_data_tasks(check):
    """The 11 offline tasks are RULER's 13 without qa_1 / qa_2 (the ones that read SQuAD / HotpotQA)."""
    from tasks.ruler.templates import TASK_NAMES

    assert [t for t in TASK_NAMES if t not in check.NEEDS_DATA] == list(check.OFFLINE)
    assert set(check.AT_8K) <= set(check.OFFLINE) and set(check.SNAP_TASKS) <= set(check.OFFLINE)


@pytest.mark.parametrize("names", [("niah_single_1", "niah_single_2", "vt"), ("cwe",)])
def test_suite_overrides_run_exactly_the_named_tasks(check, names):
    from harness.runner import suite_tasks

    cfg = check.compose(["model=tiny-random", *check.suite_overrides(names)])
    assert suite_tasks(cfg.task) == [f"ruler/{t}" for t in check.OFFLINE + check.NEEDS_DATA if t in names]


def test_scores_are_means_x100_per_method_task_and_ratio(check):
    rows = [{"method": "snapkv", "task": "ruler/vt", "keep_ratio": 0.25, "score": s} for s in (1.0, 0.0, 0.5)]
    rows += [{"method": "snapkv", "task": "ruler/vt", "keep_ratio": 0.5, "score": 1.0}]
    assert check.scores(rows) == {("snapkv", "vt", 0.25): 50.0, ("snapkv", "vt", 0.5): 100.0}
