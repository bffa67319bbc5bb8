"""Interrupt a sweep with SIGKILL / SIGINT / SIGTERM at random moments 10 times and kvbench-report 3 times,
rerun the same command each time: the final rows equal an uninterrupted run's, none lost, none duplicated, no
file is ever empty or truncated, and the report's tables equal an uninterrupted report's
(benchmarks/kill_resume.py runs more rounds)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.slow
def test_interrupted_ten_times_then_resume_gives_the_uninterrupted_rows():
    from kill_resume import kill_and_resume

    result = kill_and_resume(kills=10, n_samples=15, seed=1, verbose=False, report_kills=3)
    assert result["kills"] == 10, result
    assert len(result["signals"]) >= 2, result  # more than one kind of interrupt was exercised
    assert result["duplicates"] == 0, result
    assert result["rows"] == result["expected"] == 60, result
    assert result["equal"], result
    assert result["broken_files"] == [] and result["report_broken_files"] == [], result
    assert result["report_kills"] >= 1 and result["report_tables_equal"], result
