"""Outputs are safe to rely on: every report file and figure is written whole or not at all, files keep the user's
umask, kvbench-report refuses bad input in one line (and never counts a row twice), and no training state is
ever unpickled: a planted or garbage state file is a one-line error, and a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.errors import KvbenchError

ROOT = Path(__file__).resolve().parent.parent
RUNS = Path(__file__).parent / "fixtures" / "report" / "runs"


@pytest.fixture
def umask():
    """``os.umask`` for one test, the previous mask restored after (children of the test inherit it)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(d: Path) -> list[str]:
    """Temporary files of atomic writes (``.<name>.<random>``) or of the old ``<name>.tmp`` scheme."""
    return sorted(p.name for p in d.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def row(**kw) -> dict:
    base = {"task": "ruler/vt", "sample_id": 0, "method": "snapkv", "keep_ratio": 0.5, "model": "m", "score": 1.0}
    return {**base, **kw}


def write_run(d: Path, rows: list[dict]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


# ------------------------------------------------------------------------------------------------ figures
class Killed(BaseException):
    """A kill in the middle of a write (BaseException: nothing on the way may swallow it)."""


def test_save_figure_writes_png_and_pdf_by_the_final_name(tmp_path):
    from harness.figures import pyplot, save_figure

    fig = pyplot().figure()
    paths = save_figure(fig, tmp_path, "f", dpi=50)
    assert [p.name for p in paths] == ["f.png", "f.pdf"]
    assert paths[0].read_bytes().startswith(b"\x89PNG") and paths[1].read_bytes().startswith(b"%PDF")
    assert not pyplot().fignum_exists(fig.number) and leftovers(tmp_path) == []


def test_figure_killed_mid_save_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from harness.figures import pyplot, save_figure

    save_figure(pyplot().figure(), tmp_path, "f")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def torn_savefig(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")  # what a kill halfway through leaves in the file it wrote
        raise Killed

    monkeypatch.setattr(Figure, "savefig", torn_savefig)
    fig = pyplot().figure()
    with pytest.raises(Killed):
        save_figure(fig, tmp_path, "f")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert leftovers(tmp_path) == [] and not pyplot().fignum_exists(fig.number)


def test_report_killed_while_drawing_keeps_every_previous_figure(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from harness.report import write_report

    out = tmp_path / "out"
    first = write_report(RUNS, out)
    figures = {p: p.read_bytes() for p in first if p.suffix in (".png", ".pdf")}
    assert len(figures) >= 8 and all(figures.values())
    calls = []
    real = Figure.savefig

    def killed_on_third(self, fname, **kw):
        calls.append(fname)
        if len(calls) == 3:
            Path(fname).write_bytes(b"")
            raise Killed
        return real(self, fname, **kw)

    monkeypatch.setattr(Figure, "savefig", killed_on_third)
    with pytest.raises(Killed):
        write_report(RUNS, out)
    rewritten = list(figures)[:2]  # saved whole before the kill; the third and every later one are untouched
    assert all(p.read_bytes()[:4] in (b"\x89PNG", b"%PDF") for p in rewritten)
    assert {p: p.read_bytes() for p in figures if p not in rewritten} == {
        p: b for p, b in figures.items() if p not in rewritten}
    assert leftovers(out) == []


def test_report_outputs_are_whole_files_by_rename():
    """No writer below writes in place: each goes through harness.io (a temp file renamed onto the name)."""
    in_place = re.compile(r"\.write_text\(|\.write_bytes\(|open\([^)]*['\"][wa]b?['\"]|\.savefig\((?!tmp)|\btorch\.save\(")
    files = ["harness/report.py", "harness/figures.py", "harness/published.py", "harness/summary.py",
             "harness/reference/card.py", "harness/reference/evaluate.py", "harness/reference/train.py",
             "harness/train.py", "tasks/longbench/aggregate.py"]
    hits = [f"{f}:{i}: {line.strip()}" for f in files
            for i, line in enumerate((ROOT / f).read_text().splitlines(), 1) if in_place.search(line)]
    assert hits == []


# ------------------------------------------------------------------------------------------------ report input
def test_report_refuses_a_missing_dir_or_a_file(tmp_path):
    from harness.report import write_report

    with pytest.raises(KvbenchError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(KvbenchError, match="is not a directory"):
        write_report(tmp_path / "f")


def test_report_refuses_a_dir_without_rows(tmp_path):
    from harness.report import write_report

    with pytest.raises(KvbenchError, match="no predictions.jsonl below"):
        write_report(tmp_path)
    write_run(tmp_path / "run", [])
    with pytest.raises(KvbenchError, match="1 predictions.jsonl without rows"):
        write_report(tmp_path)


@pytest.mark.parametrize("text, needle", [
    (b"model: [unclosed\n", "is not valid YAML at line"),
    (b"\xff\xfe not utf-8\n", "is not valid YAML"),
    (b"- a list\n- not a config\n", "holds a YAML list"),
    (b"paper: {name: p, published: [{method: snapkv, task: ruler}]}\n", "published[0] needs method, task"),
    (b"paper: {name: p, sources: [a, b]}\n", "paper.sources is not a dict"),
])
def test_report_refuses_a_corrupt_config_yaml(tmp_path, text, needle):
    from harness.report import write_report

    run = write_run(tmp_path / "run", [row()])
    (run / "config.yaml").write_bytes(text)
    with pytest.raises(KvbenchError, match=re.escape(needle)) as err:
        write_report(tmp_path, tmp_path / "out")
    assert str(run / "config.yaml") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("line, needle", [
    (b"{not json}\n", "line 2 is not valid JSON"),
    (json.dumps(row(sample_id=1, score="high")).encode() + b"\n", "has score 'high', not a number"),
    (json.dumps({k: v for k, v in row(sample_id=1).items() if k != "model"}).encode() + b"\n", "has no model"),
])
def test_report_refuses_a_corrupt_predictions_file(tmp_path, line, needle):
    from harness.report import write_report

    run = write_run(tmp_path / "run", [row()])
    with open(run / "predictions.jsonl", "ab") as fh:
        fh.write(line)
    with pytest.raises(KvbenchError, match=re.escape(needle)):
        write_report(tmp_path, tmp_path / "out")


def test_report_refuses_an_out_it_cannot_write(tmp_path):
    from harness.report import write_report

    write_run(tmp_path / "runs" / "a", [row()])
    (tmp_path / "file").write_text("x")
    with pytest.raises(KvbenchError, match="is a file, not a directory"):
        write_report(tmp_path / "runs", tmp_path / "file")
    with pytest.raises(KvbenchError, match=r"cannot write .*file/sub"):
        write_report(tmp_path / "runs", tmp_path / "file" / "sub")


def test_kvbench_report_cli_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", "from harness.cli import report_main; report_main()",
                        str(tmp_path / "missing")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and ": error: " in lines[0] and "does not exist" in lines[0], r.stderr


def test_report_counts_a_key_once_per_run_dir_and_each_run_dir(tmp_path):
    from harness.report import write_report

    import pandas as pd

    write_run(tmp_path / "runs" / "a", [row(score=1.0), row(score=0.0)])  # the second is a duplicate: dropped
    write_run(tmp_path / "runs" / "b", [row(score=0.5)])  # another run of the same key: counted
    write_report(tmp_path / "runs", tmp_path / "out")
    s = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert (int(s.n.iloc[0]), float(s.score.iloc[0])) == (2, 75.0)


# ------------------------------------------------------------------------------------------------ umask
def test_run_and_report_files_follow_the_umask(tmp_path, umask):
    from harness.report import write_report

    umask(0o022)
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "harness.cli", "model=tiny-random", "task=ruler/niah_single_1",
                        "context_length=512", "n_samples=1", "max_new_tokens=2", "progress=false", "method=snapkv",
                        "keep_ratio=0.5", f"hydra.run.dir={run}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    written = write_report(run, tmp_path / "report")
    files = [run / "config.yaml", run / "metrics.json", run / "predictions.jsonl", *written]
    assert {p.name: oct(mode(p)) for p in files} == {p.name: "0o644" for p in files}
    umask(0o077)
    assert all(mode(p) == 0o600 for p in write_report(RUNS, tmp_path / "private"))


def test_profile_file_follows_the_umask(tmp_path, umask):
    from harness.profiles import Profile, save_profile

    umask(0o027)
    prof = Profile(budgets=torch.ones(2, 1, 1), ratios=torch.tensor([0.5, 1.0]), meta={"model": "m"})
    assert mode(save_profile(tmp_path / "p" / "lukv.safetensors", prof)) == 0o640
    assert leftovers(tmp_path) == []


def test_model_card_follows_the_umask_and_a_missing_checkpoint_is_one_line(tmp_path, umask, capsys):
    from harness.reference import CHECKPOINT_DIR
    from harness.reference.card import main

    ck = tmp_path / "ck"
    ck.mkdir()
    for name in ("config.json", "training_meta.json", "model.safetensors"):
        shutil.copy(CHECKPOINT_DIR / name, ck / name)
    umask(0o022)
    main(["--checkpoint", str(ck), "--results", str(tmp_path / "none"), "--hardware", "a test"])
    assert mode(ck / "README.md") == 0o644 and leftovers(tmp_path) == []
    capsys.readouterr()
    line = one_line_exit_2(capsys, lambda: main(["--checkpoint", str(tmp_path / "nope"), "--hardware", "x"]))
    assert "config.json" in line


# ------------------------------------------------------------------------------------------------ training state
class Planted:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> None:
    """A file that ``torch.load(path, weights_only=False)`` (the old state loader) would run code from."""
    torch.save({"model": Planted(marker)}, path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tokenizer the reference trainer builds for --vocab-size 400, built once and copied into each work dir."""
    from harness.reference.data import corpus_for_tokenizer
    from harness.reference.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer(corpus_for_tokenizer(), vocab_size=400).save_pretrained(d)
    return d


def reference_args(d: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    if not (d / "work" / "tokenizer").exists():
        shutil.copytree(tokenizer_dir, d / "work" / "tokenizer")
    return ["--out", str(d / "ck"), "--work-dir", str(d / "work"), "--steps", "3", "--tiny", "--batch-tokens",
            "512", "--max-len", "256", "--eval-every", "2", "--log-every", "1", "--vocab-size", "400",
            "--threads", "1", "--drill-steps", "1", "--drill-rows", "4", "--focus-steps", "1", *extra]


def one_line_exit_2(capsys, fn) -> str:
    with pytest.raises(SystemExit) as exit_:
        fn()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


def test_reference_resume_equals_an_uninterrupted_run(tmp_path, tokenizer_dir, monkeypatch, umask):
    from safetensors.torch import load_file

    import harness.reference.train as rt

    umask(0o022)
    rt.main(reference_args(tmp_path / "a", tokenizer_dir))  # 4 steps, saves after 2 and 4
    real = rt.save_train_state

    def killed_after_saving(*a, **kw):
        real(*a, **kw)
        raise Killed

    monkeypatch.setattr(rt, "save_train_state", killed_after_saving)
    with pytest.raises(Killed):
        rt.main(reference_args(tmp_path / "b", tokenizer_dir))  # killed right after the step-2 save
    monkeypatch.undo()
    assert json.loads((tmp_path / "b" / "ck" / "training_meta.json").read_text())["step"] == 2
    rt.main(reference_args(tmp_path / "b", tokenizer_dir))  # resumes at step 2
    for name in ("ck/model.safetensors", "work/state.safetensors"):  # weights, and optimizer moments and RNG
        a, b = (load_file(str(tmp_path / d / name)) for d in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    work = tmp_path / "b" / "work"
    assert not (work / "state.pt").exists() and leftovers(tmp_path) == []
    for p in [work / "state.safetensors", *(tmp_path / "b" / "ck").iterdir()]:
        assert mode(p) == 0o644, p


def test_reference_refuses_a_planted_pickle_state(tmp_path, tokenizer_dir, capsys):
    from harness.reference.train import main

    marker = tmp_path / "code-ran"
    work = tmp_path / "r" / "work"
    work.mkdir(parents=True)
    plant(work / "state.pt", marker)
    line = one_line_exit_2(capsys, lambda: main(reference_args(tmp_path / "r", tokenizer_dir)))
    assert "state.pt" in line and "never loaded" in line and not marker.exists()
    plant(work / "state.safetensors", marker)  # a pickle under the new name
    line = one_line_exit_2(capsys, lambda: main(reference_args(tmp_path / "r", tokenizer_dir)))
    assert "state.safetensors" in line and "not a usable training state" in line and not marker.exists()


def test_load_train_state_refuses_other_files_in_one_line(tmp_path):
    from safetensors.torch import save_file

    from harness.train import load_train_state, save_train_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(3)).sum().backward()
    opt.step()
    good = tmp_path / "good.safetensors"
    save_train_state(good, opt, {"step": 1}, model=model, torch_rng=True)
    cases = {
        "garbage": b"\x00" * 64,
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "empty": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "no-format"))  # a safetensors file, but not a state
    other = torch.nn.Linear(4, 2)  # the state of another model
    for name in [*cases, "no-format"]:
        with pytest.raises(KvbenchError, match="is not a usable training state") as err:
            load_train_state(tmp_path / name, opt, model=model)
        assert "\n" not in str(err.value) and name in str(err.value)
    with pytest.raises(KvbenchError, match="not a usable training state") as err:
        load_train_state(good, torch.optim.AdamW(other.parameters()), model=other)
    assert "\n" not in str(err.value)


class Tied(torch.nn.Module):
    """Input and output embeddings share one tensor, as in the reference model."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_train_state_round_trips_optimizer_and_rngs(tmp_path):
    import random

    from harness.train import load_train_state, save_train_state

    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    rng = random.Random(5)
    rng.random()
    save_train_state(tmp_path / "s", opt, {"step": 7, "history": [{"a": 1.5}]}, model=model, rng=rng, torch_rng=True)
    want = (rng.random(), torch.rand(3))

    model2 = Tied()
    opt2 = torch.optim.AdamW(model2.parameters(), betas=(0.8, 0.9))
    rng2 = random.Random(0)
    meta = load_train_state(tmp_path / "s", opt2, model=model2, rng=rng2, torch_rng=True)
    assert meta == {"step": 7, "history": [{"a": 1.5}]}
    assert (rng2.random(), torch.rand(3).tolist()) == (want[0], want[1].tolist())
    assert torch.equal(model.emb.weight, model2.emb.weight) and model2.head.weight is model2.emb.weight
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_learned_method_resume_equals_an_uninterrupted_run(tmp_path, umask):
    from test_learned import _train_cfg
    from methods._learned import load_checkpoint

    from harness.train import STATE_FILE, train

    umask(0o022)
    train(_train_cfg("lkv", tmp_path / "a", 3, **{"lkv.width": 8}))
    train(_train_cfg("lkv", tmp_path / "b", 2, **{"lkv.width": 8}))
    train(_train_cfg("lkv", tmp_path / "b", 3, **{"lkv.width": 8}))  # resumes at step 2, optimizer included
    a, b = load_checkpoint(tmp_path / "a", "lkv")[1], load_checkpoint(tmp_path / "b", "lkv")[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert leftovers(tmp_path) == []
    assert mode(tmp_path / "b" / STATE_FILE) == mode(tmp_path / "b" / "history.jsonl") == 0o644


def test_learned_checkpoint_follows_the_umask(tmp_path, umask):
    from test_learned import _train_cfg

    from harness.train import train

    umask(0o022)
    train(_train_cfg("lkv", tmp_path, 1, **{"lkv.width": 8}))
    assert {p.name: oct(mode(p)) for p in tmp_path.iterdir()} == {p.name: "0o644" for p in tmp_path.iterdir()}


def test_learned_method_refuses_a_garbage_state(tmp_path):
    from test_learned import _train_cfg

    from harness.train import STATE_FILE, train

    out = tmp_path / "lkv"
    train(_train_cfg("lkv", out, 1, **{"lkv.width": 8}))
    marker = tmp_path / "code-ran"
    plant(out / STATE_FILE, marker)
    with pytest.raises(KvbenchError, match="not a usable training state"):
        train(_train_cfg("lkv", out, 2, **{"lkv.width": 8}))
    assert not marker.exists()


def test_no_pickle_loader_on_a_data_path():
    """torch.load / pickle.load / eval / exec on file contents run code; the repository uses none of them."""
    loader = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|\bweights_only\s*=\s*False|(?<![\w.])(eval|exec)\(")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for top in ("harness", "methods", "tasks", "benchmarks", "tools", "scripts")
            for p in sorted((ROOT / top).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if loader.search(line)]
    assert hits == []
