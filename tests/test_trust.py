"""Trust: every bad value is refused with one line before anything is written, booleans are strict, a run dir is
locked, keys are never stored twice, a bad job does not stop a sweep, and Ctrl-C / SIGTERM leave a resumable run.

Checks that need no model run in-process (the preflight refuses before Hydra starts); the others run the CLI on
the tiny random model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import refused_in_process  # noqa: F401  (used below)

from harness import cli
from harness.errors import KvbenchError
from harness.io import RowStore, read_rows
from harness.lock import RunLock
from harness.schema import parse_flag, validate

ROOT = Path(__file__).resolve().parent.parent
BASE = ["model=tiny-random", "task=ruler/niah_single_1", "context_length=512", "n_samples=1", "max_new_tokens=2",
        "progress=false"]


def snapshot(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def kvbench(*args, cwd=ROOT, timeout=300, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("existing")
    r = kvbench(*BASE, "method=snapkv", "keep_ratio=0.5", f"hydra.run.dir={d}")
    assert r.returncode == 0, r.stderr
    return d


# ---- booleans ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling, value", [(True, True), (False, False), ("true", True), ("False", False),
                                             ("yes", True), ("NO", False), ("1", True), ("0", False), (1, True),
                                             (0, False)])
def test_boolean_spellings(spelling, value):
    assert parse_flag(spelling) is value


@pytest.mark.parametrize("bad", ["maybe", "False ", " true", "2", 2, -1, "", "on", "off", "y", 0.5, "none"])
@pytest.mark.parametrize("key", ["overwrite", "query_aware", "progress"])
def test_boolean_anything_else_is_an_error(capsys, key, bad):
    line = refused_in_process(capsys, *BASE, f"{key}={bad!r}" if isinstance(bad, str) else f"{key}={bad}")
    assert f"{key}=" in line and "true/false, yes/no or 1/0" in line


def test_method_boolean_spelling_is_recorded_as_a_boolean(tmp_path):
    import yaml

    r = kvbench(*BASE, "method=expected_attention", "keep_ratio=0.5", "method.scorer.use_vnorm=no",
                f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["method"]["scorer"]["use_vnorm"] is False


@pytest.mark.parametrize("args, needle", [(["paper_model=nope"], "paper_model='nope'"),
                                          (["model=nope"], "model='nope'")])
def test_unknown_group_choice(capsys, args, needle):
    assert needle in refused_in_process(capsys, *BASE, *args)


def test_query_aware_no_records_false(tmp_path):
    r = kvbench(*BASE, "method=snapkv", "keep_ratio=0.5", "query_aware=no", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    rows, _ = read_rows(tmp_path / "predictions.jsonl")
    assert [row["query_aware"] for row in rows] == [False]
    # the same config spelled another way is the same run: it resumes instead of being refused (in process: a
    # refusal would exit)
    before = (tmp_path / "predictions.jsonl").read_bytes()
    cli.main([*BASE, "method=snapkv", "keep_ratio=0.5", "query_aware=false", f"hydra.run.dir={tmp_path}"])
    assert (tmp_path / "predictions.jsonl").read_bytes() == before


# ---- every value checked before the dir is touched ------------------------------------------------------------

BAD_VALUES = [
    ("max_new_tokens=abc", "max_new_tokens='abc'"), ("max_new_tokens=-1", "max_new_tokens=-1"),
    ("max_new_tokens=0", "max_new_tokens=0"), ("keep_ratio=true", "keep_ratio=true"),
    ("keep_ratio=1.5", "(0, 1]"), ("keep_ratio=[0.5,abc]", "keep_ratio='abc'"), ("keep_ratio=[]", "empty"),
    ("keep_ratio=nan", "keep_ratio=nan"), ("n_samples=1.5", "n_samples=1.5"), ("n_samples=0", "n_samples=0"),
    ("context_length=512.7", "context_length=512.7"), ("context_length=abc", "context_length='abc'"),
    ("seed=-3", "seed=-3"), ("model.dtype=fp8", "model.dtype='fp8'"), ("model.device=gpu", "model.device='gpu'"),
    ("model.family=gpt", "model.family='gpt'"), ("task.depth=150", "task.depth=150"),
    ("method.scorer.window=0", "method.scorer.window=0"), ("method.scorer.kernel=0", "method.scorer.kernel=0"),
    ("method.selector.n_sink=-5", "method.selector.n_sink=-5"), ("method.scorer.pool=min", "method.scorer.pool='min'"),
    ("method.scorer.window=2.5", "method.scorer.window=2.5"),
    ("method.selector.n_recent=true", "method.selector.n_recent=true"),
    ("method.allocator=adakv method.allocator.alpha=1.5", "method.allocator.alpha=1.5"),
    ("method.allocator=adakv method.allocator.alpha=abc", "method.allocator.alpha='abc'"),
    ("method.allocator=pyramid method.allocator.beta=0.5", "method.allocator.beta=0.5"),
    ("method.allocator=''", "method.allocator=''"),
    ("method.name=''", "method.name=''"),
]


@pytest.mark.parametrize("override, needle", BAD_VALUES)
def test_bad_value_refused_before_anything_is_written(capsys, existing_run, override, needle):
    before = snapshot(existing_run)
    line = refused_in_process(capsys, *BASE, "method=snapkv", "keep_ratio=0.5", *override.split(), "overwrite=true",
                              f"hydra.run.dir={existing_run}")
    assert needle in line and "allowed" in line
    assert snapshot(existing_run) == before


def test_bad_value_leaves_no_new_dir(capsys, tmp_path):
    refused_in_process(capsys, *BASE, "max_new_tokens=abc", f"hydra.run.dir={tmp_path / 'new'}")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("override, needle", [
    ("keep_ration=0.5", "did you mean keep_ratio?"),
    ("method.scorer.windw=3", "did you mean method.scorer.window?"),
    ("method.window=3", "did you mean method.scorer.window?"),  # the flat spelling of before
    ("model.dtyp=float32", "did you mean model.dtype?"),
    ("n_sample=3", "did you mean n_samples?"),
])
def test_key_typo_names_the_closest_key(capsys, override, needle):
    line = refused_in_process(capsys, *BASE, "method=snapkv", override)
    assert needle in line and override.split("=")[0] in line


@pytest.mark.parametrize("override", ["keep_ratio=[0.5", "=0.5", "keep_ratio=(0.5", "keep_ratio=[0.5]]"])
def test_malformed_override(capsys, override):
    assert "override" in refused_in_process(capsys, *BASE, override)


@pytest.mark.parametrize("override", ["hydra.run.dir=", "hydra.sweep.dir=''"])
def test_empty_output_dir(capsys, override):
    assert "is empty" in refused_in_process(capsys, *BASE, override)


def test_protected_tokens_larger_than_every_budget(existing_run):
    before = snapshot(existing_run)
    r = kvbench(*BASE, "method=snapkv", "keep_ratio=[0.1,0.25]", "method.selector.n_recent=400", "overwrite=true",
                f"hydra.run.dir={existing_run}")
    assert r.returncode == 2 and "method.selector.n_recent" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(existing_run) == before


def test_schema_dedupes_keep_ratios():
    cfg = {"keep_ratio": [0.5, 0.25, 0.5], "context_length": 512, "n_samples": 1, "seed": 0, "query_aware": False,
           "model": {"name": "tiny-random"}, "task": {"name": "ruler/niah_single_1"}, "method": {"name": "full"}}
    assert validate(cfg).keep_ratio == [0.5, 0.25]


# ---- keys stored once ---------------------------------------------------------------------------------------

def row(sample_id, ratio=0.5, score=1.0):
    return {"task": "t", "sample_id": sample_id, "method": "m", "keep_ratio": ratio, "score": score}


def test_duplicated_line_in_a_file_is_read_once(tmp_path):
    p = tmp_path / "predictions.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [row("0"), row("1", score=0.0), row("0", score=0.0)]))
    rows, _ = read_rows(p)
    assert [(r["sample_id"], r["score"]) for r in rows] == [("0", 1.0), ("1", 0.0)]


def test_store_never_writes_a_key_twice(tmp_path):
    p = tmp_path / "predictions.jsonl"
    store = RowStore(p)
    store.append([row("0"), row("0", score=0.0), row("0", ratio=0.5000000001)])
    store.append([row("0")])
    assert len(read_rows(p, dedupe=False)[0]) == 1


def test_duplicate_ratio_list_writes_one_row(tmp_path):
    r = kvbench(*BASE, "method=snapkv", "keep_ratio=[0.5,0.5]", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert len(read_rows(tmp_path / "predictions.jsonl", dedupe=False)[0]) == 1


@pytest.mark.parametrize("line", [b"[1, 2]\n", b'"a row"\n', b'{"task": "t"}\n', b'{"task": "t\xff"}\n'])
def test_bad_middle_line_is_a_named_error(tmp_path, line):
    p = tmp_path / "predictions.jsonl"
    p.write_bytes(json.dumps(row("0")).encode() + b"\n" + line + json.dumps(row("1")).encode() + b"\n")
    with pytest.raises(KvbenchError, match="line 2"):
        read_rows(p)


# ---- the run-dir lock -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def held_lock(run_dir: Path):
    """Another process holding the run dir's lock for the duration (killed afterwards); yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from harness.lock import RunLock\n"
        f"with RunLock({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(300)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_second_lock_is_refused_at_once_naming_the_holder(tmp_path):
    with held_lock(tmp_path) as pid:
        start = time.monotonic()
        with pytest.raises(KvbenchError, match=f"pid {pid}"):
            with RunLock(tmp_path):
                pass
        assert time.monotonic() - start < 1.0
        assert list(tmp_path.iterdir()) == []  # locking wrote nothing into the dir
    with RunLock(tmp_path):  # the kernel released the killed holder's lock
        pass


def test_kvbench_on_a_locked_dir_is_refused_and_leaves_it_untouched(capsys, tmp_path):
    args = [*BASE, "n_samples=2", "method=snapkv", "keep_ratio=0.5", f"hydra.run.dir={tmp_path}"]
    assert kvbench(*args).returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with held_lock(tmp_path) as pid:
        # even a run that would clear the dir touches nothing (the command in process; the holder is another one)
        line = refused_in_process(capsys, *args, "overwrite=true")
    assert "in use by another kvbench run" in line and f"pid {pid}" in line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_two_identical_runs_started_together_never_duplicate_a_row(tmp_path):
    # Which run wins is up to the scheduler: the loser is refused at once, or (when the winner has already
    # finished by the time it reaches the lock) resumes a complete dir and adds nothing. Either way each row
    # is stored exactly once; the deterministic refusal is the test above.
    args = [*BASE, "n_samples=3", "context_length=1024", "method=snapkv", "keep_ratio=[0.25,0.5]",
            f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), outs
    for p, (_, err) in zip(procs, outs):
        if p.returncode == 2:
            assert "in use by another kvbench run" in err and len(err.strip().splitlines()) == 1, err
    rows = read_rows(tmp_path / "predictions.jsonl", dedupe=False)[0]
    assert len(rows) == 6 and len({RowStore.key(r) for r in rows}) == 6


# ---- sweeps ---------------------------------------------------------------------------------------------------

def test_bad_job_does_not_stop_the_sweep(tmp_path):
    r = kvbench("-m", *BASE, "method=snapkv", "keep_ratio=0.5,abc,0.25", f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("kvbench: error:")]
    assert len(errors) == 2 and "keep_ratio='abc'" in errors[0] and "1 job(s) of the sweep failed" in errors[1]
    done = sorted(p.parent.name for p in tmp_path.rglob("predictions.jsonl"))
    assert len(done) == 2 and any("keep_ratio=0.25" in d for d in done)


def test_sweep_where_every_job_is_bad_is_one_line(capsys):
    line = refused_in_process(capsys, "-m", *BASE, "method=snapkv,h2o", "max_new_tokens=-2")
    assert "max_new_tokens=-2" in line


# ---- interrupts -----------------------------------------------------------------------------------------------

def run_until_rows(args, run_dir: Path, n_rows: int, sig: int) -> subprocess.CompletedProcess:
    """Start kvbench, send ``sig`` once ``n_rows`` rows are written, and return what it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    path = run_dir / "predictions.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n_rows:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


# 32 rows, cut after 2: the rest takes a second or more, so the signal lands mid-run even on a loaded machine
INTERRUPTED = [*BASE, "n_samples=16", "method=snapkv", "keep_ratio=[0.25,0.5]"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The rows of INTERRUPTED run once without an interrupt (both signals' runs are compared with it)."""
    d = tmp_path_factory.mktemp("uninterrupted")
    ref = kvbench(*INTERRUPTED, f"hydra.run.dir={d}")
    assert ref.returncode == 0, ref.stderr
    return d


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_is_one_line_and_resumes_to_the_same_rows(tmp_path, uninterrupted_run, sig, code):
    args = INTERRUPTED
    run_dir = tmp_path / "cut"
    r = run_until_rows([*args, f"hydra.run.dir={run_dir}"], run_dir, 2, sig)
    assert r.returncode == code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("kvbench: interrupted after ") and "rerun the same command to resume" in lines[0]
    again = kvbench(*args, f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stderr

    def keyed(d):
        volatile = ("prefill_s", "compress_s", "decode_s", "decode_ms_per_token", "peak_mem_bytes")
        return sorted(json.dumps({k: v for k, v in r.items() if k not in volatile}, sort_keys=True)
                      for r in read_rows(d / "predictions.jsonl", dedupe=False)[0])

    assert keyed(run_dir) == keyed(uninterrupted_run)


def test_a_config_file_that_is_not_yaml_is_one_line(capsys, tmp_path):
    """A user's config dir holding a broken yaml (unclosed list at its last line): one line naming the file and
    the line where parsing stopped, no run dir made."""
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "mine.yaml").write_text(
        "defaults:\n  - _common\n  - scorer: snapkv\n  - _self_\nname: mine\nscorer: [1, 2\n")
    line = refused_in_process(capsys, "--config-dir", str(tmp_path / "conf"), *BASE, "method=mine",
                              f"hydra.run.dir={tmp_path / 'run'}")
    assert f"{str(tmp_path / 'conf' / 'method' / 'mine.yaml')!r} is not valid YAML at line 7" in line
    assert not (tmp_path / "run").exists()
