"""Kill a kvbench sweep with SIGKILL at random moments, rerun the same command each time, and check that the
final rows equal those of an uninterrupted run: none lost, none duplicated.

    python benchmarks/kill_resume.py --kills 20

The test suite runs the same check with fewer samples (tests/test_reliability.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW_FIELDS = ("task", "sample_id", "method", "keep_ratio", "prediction", "score", "kept_tokens", "kv_bytes")


def command(run_dir: Path, n_samples: int) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "model=tiny-random", "method=snapkv", "task=ruler/niah_single_1",
            "keep_ratio=[0.25,0.5]", "context_length=512", f"n_samples={n_samples}", "max_new_tokens=8",
            "progress=false", f"hydra.run.dir={run_dir}"]


def rows(run_dir: Path) -> list[tuple]:
    from harness.io import read_rows

    found, _ = read_rows(run_dir / "predictions.jsonl")
    return sorted(tuple(json.dumps(r.get(k)) for k in ROW_FIELDS) for r in found)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def kill_and_resume(kills: int, n_samples: int, seed: int = 0, verbose: bool = True) -> dict:
    """Run once uninterrupted; then start the same command into another dir and SIGKILL it at a random moment,
    ``kills`` times (each rerun resumes the last), and finish it. Compare the rows."""
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = Path(tempfile.mkdtemp(prefix="kvbench-kill-"))
    reference, victim = root / "reference", root / "victim"
    start = time.perf_counter()
    subprocess.run(command(reference, n_samples), check=True, env=env, capture_output=True)
    full_s = time.perf_counter() - start
    from harness.io import read_rows

    ref_rows, _ = read_rows(reference / "predictions.jsonl")
    # Work per sample on this machine (from the rows' own timings): kills land within a sample's processing.
    sample_s = sum(r["prefill_s"] + r["compress_s"] + r["decode_s"] for r in ref_rows) / max(1, n_samples)
    done = 0
    for i in range(3 * kills):
        if done == kills:
            break
        size = _size(victim / "predictions.jsonl")
        proc = subprocess.Popen(command(victim, n_samples), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        # Wait until this round has appended rows (so the kill lands mid-sweep, not during start-up), then
        # kill at a random moment: while decoding, scoring or writing the next sample.
        waited = 0.0
        while proc.poll() is None and _size(victim / "predictions.jsonl") == size and waited < 120:
            time.sleep(0.02)
            waited += 0.02
        time.sleep(rng.uniform(0.0, 1.5 * sample_s))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            done += 1
        proc.wait()
        if verbose:
            n = len(rows(victim)) if (victim / "predictions.jsonl").exists() else 0
            print(f"round {i + 1}: {'killed' if proc.returncode < 0 else 'finished'}, {n} rows so far")
        if proc.returncode == 0:
            break  # the sweep completed before a kill: nothing left to interrupt
    subprocess.run(command(victim, n_samples), check=True, env=env, capture_output=True)
    want, got = rows(reference), rows(victim)
    return {"kills": done, "rows": len(got), "expected": len(want), "equal": want == got,
            "duplicates": len(got) - len(set(got))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--samples", type=int, default=12)
    args = parser.parse_args()
    result = kill_and_resume(args.kills, args.samples)
    print(json.dumps(result))
    sys.exit(0 if result["equal"] and result["duplicates"] == 0 else 1)


if __name__ == "__main__":
    main()
