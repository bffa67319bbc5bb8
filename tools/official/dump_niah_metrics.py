"""Regenerate tests/fixtures/niah/metric_cases.json from NVIDIA/kvpress's own Needle-in-a-Haystack scoring.

    .venv/bin/python tools/official/dump_niah_metrics.py <kvpress checkout> [--commit SHA] [--out PATH]

``<kvpress checkout>`` is a work tree of github.com/NVIDIA/kvpress (or any directory holding its
``evaluation/benchmarks/needle_in_haystack/calculate_metrics.py``). That file is imported as it is and its
``calculate_metrics`` run on a one-row DataFrame per case (``needle``, ``predicted_answer``), so a case on which it
raises (an empty prediction) does not take the others with it: the error is recorded instead of a result. It
needs pandas and the ``rouge`` package (kvpress's ``eval`` extra), both dependencies of kvbench. The commit comes
from ``git rev-parse HEAD`` in the checkout, or ``--commit`` (a copy of the file outside git).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFICIAL_FILE = "evaluation/benchmarks/needle_in_haystack/calculate_metrics.py"
OUT = REPO_ROOT / "tests/fixtures/niah/metric_cases.json"

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
PASSKEY = "The pass key is 71432. Remember it. 71432 is the pass key."
# (needle, prediction): exact and partial retrievals, case and punctuation (the package splits on "." and
# whitespace only), verbose answers, repeats (clipped n-gram counts), one-word predictions (no bigram), wrong
# answers, and the predictions the package refuses (empty, periods only).
CASES = [
    (NEEDLE, NEEDLE),
    (NEEDLE, "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."),
    (NEEDLE, " eat a sandwich and sit in Dolores Park on a sunny day.\n"),
    (NEEDLE, "eat a sandwich and sit in dolores park on a sunny day"),
    (NEEDLE, "Eat a sandwich, and sit in Dolores Park, on a sunny day!"),
    (NEEDLE, "The best thing to do in San Francisco is to eat a sandwich and sit in Dolores Park on a sunny day. "
             "The document also talks about startups and how to find good ideas for them."),
    (NEEDLE, "sit in Dolores Park. Eat a sandwich. On a sunny day."),
    (NEEDLE, "sandwich sandwich sandwich sandwich"),
    (NEEDLE, "Dolores"),
    (NEEDLE, "The best thing to do in San Francisco is to visit the Golden Gate Bridge."),
    (NEEDLE, "I don't know."),
    (NEEDLE, "day sunny a on Park Dolores in sit and sandwich a eat"),
    (NEEDLE, "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n\n"
             "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."),
    (PASSKEY, "71432"),
    (PASSKEY, "The pass key is 71432."),
    (NEEDLE, ""),
    (NEEDLE, "   \n "),
    (NEEDLE, "..."),
]


def load_official(checkout: Path):
    path = checkout / OFFICIAL_FILE
    if not path.is_file():
        sys.exit(f"dump_niah_metrics: {path} not found; pass a checkout of github.com/NVIDIA/kvpress")
    spec = importlib.util.spec_from_file_location("kvpress_niah_calculate_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkout_commit(checkout: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--commit", help="the kvpress commit the file comes from (default: git rev-parse HEAD)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import pandas as pd
    import rouge

    official = load_official(args.checkout)
    commit = args.commit or checkout_commit(args.checkout)
    if not commit:
        sys.exit("dump_niah_metrics: the checkout is not a git work tree; pass --commit <sha>")
    cases = []
    for needle, prediction in CASES:
        frame = pd.DataFrame([{"needle": needle, "predicted_answer": prediction}])
        try:
            expected, error = official.calculate_metrics(frame)[0], None
        except Exception as err:  # noqa: BLE001 - recorded: kvpress stops on it, kvbench scores 0.0
            expected, error = None, f"{type(err).__name__}: {err}"
        cases.append({"needle": needle, "prediction": prediction, "expected": expected, "error": error})
    fixture = {
        "source": {"repo": "NVIDIA/kvpress", "commit": commit, "file": OFFICIAL_FILE,
                   "rouge": getattr(rouge, "__version__", "unknown"),
                   "command": "python tools/official/dump_niah_metrics.py <kvpress checkout>"},
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(cases)} cases -> {args.out}")


if __name__ == "__main__":
    main()
