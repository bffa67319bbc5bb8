"""Kill a sweep with SIGKILL at random moments 10 times, rerun the same command each time: the final rows equal
an uninterrupted run's, none lost, none duplicated (benchmarks/kill_resume.py runs more rounds)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_sigkill_ten_times_then_resume_gives_the_uninterrupted_rows():
    from kill_resume import kill_and_resume

    result = kill_and_resume(kills=10, n_samples=30, seed=1, verbose=False)
    assert result["kills"] == 10, result
    assert result["duplicates"] == 0, result
    assert result["rows"] == result["expected"] == 60, result
    assert result["equal"], result
