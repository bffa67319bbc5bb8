"""Interrupt a kvbench sweep and kvbench-report at random moments with SIGKILL, SIGINT or SIGTERM, rerun the same
command each time, and check that the final rows equal those of an uninterrupted run (none lost, none
duplicated) and that no output file is ever left empty or truncated.

    python benchmarks/kill_resume.py --kills 20 --report-kills 5

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
SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}


def command(sweep_dir: Path, n_samples: int) -> list[str]:
    """A two-job sweep (two methods), each job two keep ratios from one prefill."""
    return [sys.executable, "-m", "harness.cli", "-m", "model=tiny-random", "method=snapkv,streaming_llm",
            "task=ruler/niah_single_1", "keep_ratio=[0.25,0.5]", "context_length=512", f"n_samples={n_samples}",
            "max_new_tokens=8", "progress=false", f"hydra.sweep.dir={sweep_dir}"]


def report_command(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "from harness.cli import report_main; report_main()", str(root), "--out", str(out)]


def rows(sweep_dir: Path) -> list[tuple]:
    from harness.io import read_rows

    found = []
    for path in sorted(sweep_dir.rglob("predictions.jsonl")):
        found.extend(read_rows(path, dedupe=False)[0])
    return sorted(tuple(json.dumps(r.get(k)) for k in ROW_FIELDS) for r in found)


def n_lines(sweep_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in sweep_dir.rglob("predictions.jsonl"))


def broken_files(root: Path) -> list[str]:
    """Files below ``root`` that are empty or truncated: every config/metrics/table must parse, every figure must
    end as its format ends. Rows files may end in a torn line (cut on resume), never elsewhere."""
    import yaml

    from harness.errors import KvbenchError
    from harness.io import read_rows

    bad = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            continue  # a temp file of an interrupted atomic write: never under the final name
        data = path.read_bytes()
        try:
            if not data:
                raise ValueError("empty")
            if path.suffix == ".json":
                json.loads(data)
            elif path.suffix == ".yaml":
                assert isinstance(yaml.safe_load(data), dict)
            elif path.name == "predictions.jsonl":
                read_rows(path)
            elif path.suffix == ".png":
                assert data.startswith(b"\x89PNG") and data.rstrip().endswith(b"IEND\xaeB`\x82")
            elif path.suffix == ".pdf":
                assert data.rstrip().endswith(b"%%EOF")
            elif path.suffix in (".md", ".csv", ".tex"):
                assert data.endswith(b"\n")
        except (ValueError, AssertionError, yaml.YAMLError, KvbenchError) as err:
            bad.append(f"{path.relative_to(root)}: {err or 'truncated'}")
    return bad


def _interrupt(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        # SIGKILL takes the whole group; INT / TERM go to kvbench alone, as a terminal or a scheduler sends them
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)


def kill_and_resume(kills: int, n_samples: int, seed: int = 0, verbose: bool = True, signals=("KILL", "INT", "TERM"),
                    report_kills: int = 0) -> dict:
    """Run once uninterrupted; then start the same command into another dir and interrupt it at a random moment
    with a random signal of ``signals``, ``kills`` times (each rerun resumes the last), and finish it. Compare
    the rows, and check every file after every interruption. Then interrupt ``kvbench-report`` on the finished
    sweep ``report_kills`` times the same way and compare its tables with an uninterrupted report's."""
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    root = Path(tempfile.mkdtemp(prefix="kvbench-kill-"))
    reference, victim = root / "reference", root / "victim"
    subprocess.run(command(reference, n_samples), check=True, env=env, capture_output=True)
    from harness.io import read_rows

    ref_rows = [r for p in reference.rglob("predictions.jsonl") for r in read_rows(p)[0]]
    # Work per sample on this machine (from the rows' own timings): kills land within a sample's processing.
    sample_s = sum(r["prefill_s"] + r["compress_s"] + r["decode_s"] for r in ref_rows) / max(1, len(ref_rows) / 2)
    done, used, broken = 0, {}, []
    for i in range(3 * kills):
        if done == kills:
            break
        size = n_lines(victim)
        proc = subprocess.Popen(command(victim, n_samples), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, text=True)
        # Wait until this round has appended rows (so the interrupt lands mid-sweep, not during start-up), then
        # interrupt at a random moment: while decoding, scoring or writing the next sample.
        waited = 0.0
        while proc.poll() is None and n_lines(victim) == size and waited < 120:
            time.sleep(0.02)
            waited += 0.02
        time.sleep(rng.uniform(0.0, 1.5 * sample_s))
        name = rng.choice(list(signals))
        if proc.poll() is None:
            _interrupt(proc, SIGNALS[name])
            done += 1
            used[name] = used.get(name, 0) + 1
        _, err = proc.communicate()
        broken += [f"after {name}: {b}" for b in broken_files(victim)]
        if "Traceback" in err:
            broken.append(f"after {name}: a traceback was printed: {err.strip().splitlines()[-1]}")
        if verbose:
            print(f"round {i + 1}: {name if proc.returncode != 0 else 'finished'}, {len(rows(victim))} rows so far")
        if proc.returncode == 0:
            break  # the sweep completed before an interrupt: nothing left to interrupt
    subprocess.run(command(victim, n_samples), check=True, env=env, capture_output=True)
    want, got = rows(reference), rows(victim)
    result = {"kills": done, "signals": used, "rows": len(got), "expected": len(want), "equal": want == got,
              "duplicates": len(got) - len(set(got)), "broken_files": broken}
    if report_kills:
        result.update(interrupt_report(reference, root, report_kills, rng, signals, env))
    return result


def interrupt_report(sweep: Path, root: Path, kills: int, rng: random.Random, signals, env) -> dict:
    whole, victim = root / "report-whole", root / "report-victim"
    start = time.perf_counter()
    subprocess.run(report_command(sweep, whole), check=True, env=env, capture_output=True)
    report_s = time.perf_counter() - start
    broken, done = [], 0
    for _ in range(kills):
        proc = subprocess.Popen(report_command(sweep, victim), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, text=True)
        time.sleep(rng.uniform(0.3 * report_s, report_s))  # past start-up: while tables and figures are written
        name = rng.choice(list(signals))
        done += proc.poll() is None
        _interrupt(proc, SIGNALS[name])
        proc.communicate()
        broken += [f"report after {name}: {b}" for b in broken_files(victim)]
    subprocess.run(report_command(sweep, victim), check=True, env=env, capture_output=True)
    tables = sorted(p.name for p in whole.iterdir() if p.suffix in (".md", ".csv"))
    same = all((whole / t).read_bytes() == (victim / t).read_bytes() for t in tables)
    return {"report_kills": done, "report_broken_files": broken, "report_tables_equal": same}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--report-kills", type=int, default=5)
    parser.add_argument("--signals", default="KILL,INT,TERM", help="comma list of KILL, INT, TERM")
    args = parser.parse_args()
    result = kill_and_resume(args.kills, args.samples, signals=args.signals.split(","),
                             report_kills=args.report_kills)
    print(json.dumps(result))
    ok = result["equal"] and not result["duplicates"] and not result["broken_files"]
    ok = ok and not result.get("report_broken_files") and result.get("report_tables_equal", True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
