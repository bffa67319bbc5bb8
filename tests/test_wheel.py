"""kvbench as an installed package: a wheel built from this tree, installed alone into a target dir (its
dependencies from this venv), runs from an empty working dir with the repository nowhere on sys.path: the
configs, the reference model and its learned files come from the package, runs go to ./results, the report reads
them, --version and python -m kvbench work, a user config dir adds a method, and the README's library block runs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# what a source tree holds that a wheel build must not see (caches, outputs, this venv)
NOT_SOURCE = (".venv", ".git", "results", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".peers")
RUN = ["model=tiny-random", "method=snapkv", "keep_ratio=0.5", "task=ruler/niah_single_1", "n_samples=1",
       "context_length=512", "progress=false"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site dir, wheel path)``: the wheel of a copy of this tree, installed with ``pip --target``."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))  # the build writes build/ in its tree
    pip = [sys.executable, "-m", "pip"]
    r = subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("kvbench-*.whl")
    site = tmp / "site"
    r = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel), "-q"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return site, wheel


def env_for(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return {**env, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_in(work: Path, site: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=work, env=env_for(site), capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_every_config_the_reference_files_and_metadata(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")}
    assert len(configs) > 90 and configs <= names  # nested groups too: method/scorer/, task/ruler/, ...
    assert {"conf/__init__.py", "kvbench/__init__.py", "kvbench/__main__.py", "kvbench/py.typed"} <= names
    for tracked in ("harness/reference/checkpoint/model.safetensors", "harness/reference/checkpoint/tokenizer.json",
                    "harness/reference/lkv/params.safetensors", "harness/reference/spkv/params.safetensors",
                    "harness/reference/lukv_profile.safetensors", "tasks/ruler/data/fallback_essays.txt"):
        assert tracked in names, tracked
    assert not [n for n in names if n.endswith("history.jsonl")]  # training logs stay in the repository
    dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist}/licenses/LICENSE" in names
    meta = zipfile.ZipFile(wheel).read(f"{dist}/METADATA").decode()
    import kvbench

    assert f"Version: {kvbench.__version__}" in meta and "License-Expression: Apache-2.0" in meta
    assert "Provides-Extra: dev" in meta and "Classifier: Programming Language :: Python :: 3" in meta
    entry_points = zipfile.ZipFile(wheel).read(f"{dist}/entry_points.txt").decode()
    assert "kvbench = harness.cli:main" in entry_points and "kvbench-report = harness.cli:report_main" in entry_points


@pytest.mark.slow
def test_installed_kvbench_runs_from_an_empty_dir(installed, tmp_path):
    site, _ = installed
    work = tmp_path / "work"
    work.mkdir()
    py = sys.executable
    # every package comes from the install, none from the repository
    r = run_in(work, site, py, "-c", "import json, conf, harness, kvbench, methods, tasks; "
               "print(json.dumps([m.__file__ for m in (conf, harness, kvbench, methods, tasks)]))")
    assert r.returncode == 0, r.stderr[-3000:]
    files = [Path(f) for f in json.loads(r.stdout)]
    assert all(f.is_relative_to(site) for f in files), files
    r = run_in(work, site, py, "-m", "kvbench", "--version")
    assert r.returncode == 0 and re.fullmatch(r"kvbench \d+\.\d+\.\d+\S*\n", r.stdout), (r.stdout, r.stderr)

    r = run_in(work, site, py, "-m", "kvbench", *RUN)
    assert r.returncode == 0, r.stderr[-3000:]
    (predictions,) = (work / "results" / "runs").glob("*/predictions.jsonl")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["method"] == "snapkv" and rows[0]["error"] is None
    r = run_in(work, site, py, "-m", "kvbench", "method=nope")  # the installed configs name the choices
    assert r.returncode == 2 and "allowed: asl," in r.stderr and "snapkv" in r.stderr, r.stderr

    # the installed console scripts (pip --target writes them to <site>/bin)
    r = run_in(work, site, str(site / "bin" / "kvbench-report"), "results")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "results" / "summary.md").is_file() and "snapkv" in (work / "results" / "summary.md").read_text()

    # the shipped reference model and the learned files its methods read (harness/reference/lkv)
    r = run_in(work, site, str(site / "bin" / "kvbench"), "model=reference", "method=lkv", "keep_ratio=0.25",
               "task=ruler/niah_single_1", "n_samples=1", "context_length=1024", "progress=false",
               "hydra.run.dir=results/reference")
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(line) for line in (work / "results" / "reference" / "predictions.jsonl").read_text().splitlines()]
    assert row["model"] == "reference" and row["method"] == "lkv" and row["error"] is None and row["score"] == 1.0
    inputs = yaml.safe_load((work / "results" / "reference" / "config.yaml").read_text())["inputs"]
    assert "model" in inputs and any(k.startswith("method.") for k in inputs), inputs  # both found and read

    # a user config dir beside the runs adds a method
    (work / "my_conf" / "method").mkdir(parents=True)
    (work / "my_conf" / "method" / "snap16.yaml").write_text(
        "defaults: [_common, {scorer: snapkv}, _self_]\nname: snap16\nscorer: {window: 16}\n")
    r = run_in(work, site, py, "-m", "kvbench", "--config-dir", "my_conf", *RUN[:1], "method=snap16", *RUN[2:],
               "max_new_tokens=2", "hydra.run.dir=results/mine")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((work / "results" / "mine" / "predictions.jsonl").read_text())["method"] == "snap16"


@pytest.mark.slow
def test_readme_library_block_runs_against_the_installed_package(installed, tmp_path):
    from test_library import readme_library_block

    site, _ = installed
    (tmp_path / "snippet.py").write_text(readme_library_block())
    r = run_in(tmp_path, site, sys.executable, "snippet.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "results" / "sweeps" / "library").glob("*/predictions.jsonl"))) == 2
