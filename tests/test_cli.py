"""Bad input: one line on stderr naming the bad value and the allowed ones (or the fix), exit status 2, and an
existing results dir left byte-for-byte unchanged.

The refusals run the command in this process (``refused_in_process``: the preflight refuses before Hydra makes a
dir, so no interpreter start is needed); the runs that write rows run the real command in a subprocess."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import refused_in_process

ROOT = Path(__file__).resolve().parent.parent
BASE = ["model=tiny-random", "task=ruler/niah_single_1", "context_length=512", "n_samples=1", "max_new_tokens=2",
        "progress=false"]


def kvbench(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def snapshot(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("existing")
    r = kvbench(*BASE, "method=snapkv", "keep_ratio=0.5", f"hydra.run.dir={d}")
    assert r.returncode == 0, r.stderr
    assert {"config.yaml", "predictions.jsonl", "metrics.json"} <= set(snapshot(d))
    return d


def assert_refused(capsys, monkeypatch, args, *needles):
    """``kvbench args`` run from the repository (as the command's subprocesses here are): exit status 2, one
    ``kvbench: error: ...`` line holding every needle."""
    monkeypatch.chdir(ROOT)
    line = refused_in_process(capsys, *args)
    for n in needles:
        assert n in line, line


@pytest.mark.parametrize(
    "args, needles",
    [
        (["method=nope"], ["method='nope'", "allowed:", "snapkv"]),
        (["task=ruler/nope"], ["task='ruler/nope'", "allowed:", "ruler/niah_single_1"]),
        (["model=gpt5"], ["model='gpt5'", "allowed:", "tiny-random"]),
        (["method=snapkv", "method.allocator=nope"], ["method.allocator='nope'", "allowed:", "uniform"]),
        (["method=snapkv", "keep_ratio=1.5"], ["keep_ratio=1.5", "(0, 1]"]),
        (["method=snapkv", "keep_ratio=0"], ["keep_ratio=0", "(0, 1]"]),
        (["method=snapkv", "keep_ratio=[]"], ["keep_ratio=[]", "empty"]),
        (["method=snapkv", "keep_ratio=0.5", "context_length=20"], ["context_length=20", "too short"]),
        (["method=snapkv", "keep_ratio=0.5", "context_length=10000000"], ["context_length=10000000", "maximum"]),
        (["model=hf", "model.path=someorg/some-model-not-cached"], ["hub id", "HF_HUB_OFFLINE=1", "model.path=<the checkpoint dir>"]),
        (["model=hf", "model.path=/nonexistent/dir"], ["does not exist"]),
    ],
)
def test_bad_input_one_line_exit_2_and_dir_unchanged(capsys, monkeypatch, existing_run, args, needles):
    before = snapshot(existing_run)
    args = [a for a in BASE if a.split("=")[0] not in {x.split("=")[0] for x in args}] + args
    assert_refused(capsys, monkeypatch, [*args, f"hydra.run.dir={existing_run}"], *needles)
    assert snapshot(existing_run) == before


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A LongBench file with a malformed line 2, and a LU-KV profile made for a 3-layer model."""
    import torch

    from harness.profiles import Profile, save_profile

    d = tmp_path_factory.mktemp("bad")
    lines = (ROOT / "tests/fixtures/longbench/trec.jsonl").read_text().splitlines()
    (d / "trec.jsonl").write_text("\n".join([lines[0], '{"input": broken'] + lines[2:]) + "\n")
    save_profile(d / "other.safetensors", Profile(budgets=torch.full((2, 3, 2), 0.5), ratios=torch.tensor([0.25, 0.5]),
                                                  meta={"model": "other-3-layer-model"}))
    return d


@pytest.mark.parametrize(
    "args, needles",
    [
        (["task=longbench/trec", "task.data_dir={bad}", "method=snapkv"], ["trec.jsonl:2", "malformed"]),
        (["task=ruler/qa_1", "method=snapkv"], ["ruler/qa_1", "dev-v2.0.json", "task.data_dir"]),
        (["method=lkv"], ["method.scorer.checkpoint", "trained for model reference", "kvbench-train"]),
        (["method=lukv", "method.allocator.profile={bad}/other.safetensors"], ["method.allocator.profile", "3 layers", "kvbench-profile"]),
    ],
)
def test_bad_data_checkpoint_profile_one_line_and_dir_unchanged(capsys, monkeypatch, existing_run, bad_inputs, args,
                                                                needles):
    before = snapshot(existing_run)
    args = [a.format(bad=bad_inputs) for a in args]
    base = [a for a in BASE if not (a.startswith("task=") and any(x.startswith("task=") for x in args))]
    assert_refused(capsys, monkeypatch, [*base, *args, f"hydra.run.dir={existing_run}"], *needles)
    assert snapshot(existing_run) == before


def test_changed_config_in_existing_dir_refused_unless_overwrite(capsys, monkeypatch, existing_run):
    before = snapshot(existing_run)
    assert_refused(capsys, monkeypatch, [*BASE, "method=h2o", "keep_ratio=0.5", f"hydra.run.dir={existing_run}"],
                   "different config", "method", "overwrite=true")
    assert snapshot(existing_run) == before


def test_non_writable_output_dir(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_refused(capsys, monkeypatch, [*BASE, "method=snapkv", f"hydra.run.dir={blocker}/run"], "not writable")


def test_rerun_resumes_without_duplicates(existing_run):
    before = (existing_run / "predictions.jsonl").read_text()
    r = kvbench(*BASE, "method=snapkv", "keep_ratio=0.5", f"hydra.run.dir={existing_run}")
    assert r.returncode == 0, r.stderr
    assert (existing_run / "predictions.jsonl").read_text() == before


def test_same_config_gives_identical_predictions(existing_run, tmp_path):
    import json

    r = kvbench(*BASE, "method=snapkv", "keep_ratio=0.5", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    def preds(d):
        return [(j["sample_id"], j["prediction"], j["kept_tokens"], j["kv_bytes"])
                for j in map(json.loads, (d / "predictions.jsonl").read_text().splitlines())]
    assert preds(tmp_path) == preds(existing_run)
