"""A multirun through Hydra's submitit_local launcher: each (method, ratio) runs as its own job (process), the
jobs share only the output tree, and the report merges them like a local multirun."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def test_submitit_local_sweep_runs_separate_jobs_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "harness.cli", "-m", "hydra/launcher=submitit_local", "method=full,snapkv",
            "keep_ratio=0.25,0.5", "model=tiny-random", "task=ruler/niah_single_1", "context_length=512",
            "n_samples=2", "max_new_tokens=4", "progress=false", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = [p for p in (sweep / ".submitit").iterdir() if p.name != "%j"]
    assert len(jobs) == 4  # one submitit job (its own process) per config
    runs = sorted(p.parent.name for p in sweep.rglob("predictions.jsonl"))
    assert len(runs) == 4
    r = subprocess.run([sys.executable, "-c", "from harness.cli import report_main; report_main()", str(sweep)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_csv(sweep / "summary.csv")
    assert sorted(zip(table["method"], table["keep_ratio"])) == [("full", 0.25), ("full", 0.5),
                                                                ("snapkv", 0.25), ("snapkv", 0.5)]
    assert (table["n"] == 2).all()
