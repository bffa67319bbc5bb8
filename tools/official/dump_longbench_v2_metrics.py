"""Regenerate tests/fixtures/longbench_v2/metric_cases.json from the official LongBench v2 code.

    python tools/official/dump_longbench_v2_metrics.py <checkout of THUDM/LongBench> [--commit SHA] [--out PATH]

The checkout is the repository root (pred.py, result.py, prompts/ of the v2 code). Nothing of it is imported
into kvbench: this script runs the official code itself on fixed cases and writes only cases and outputs.

- ``extract_cases``: pred.py's ``extract_answer`` (its source, taken out of pred.py with ``ast``: pred.py
  cannot be imported offline) on ``response.strip()`` as ``get_pred`` calls it, and ``judge = pred == answer``;
- ``aggregate_cases``: result.py run as a script (``exec`` of its source in a scratch dir holding ``results/``,
  one prediction list per file, each item with pred.py's ``pred`` and ``judge``), its ``result.txt`` parsed;
  ``compensated`` cases run result.py with its ``compensated = False`` line switched to True;
- ``template_sha256``: prompts/0shot.txt, 0shot_cot.txt, 0shot_cot_ans.txt (kvbench's copies are checked).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "longbench_v2" / "metric_cases.json"

RESPONSES = [
    ("The correct answer is (B)", "B"),
    ("The correct answer is (B)", "C"),
    ("**The correct answer is (C)**", "C"),
    ("The correct answer is D.", "D"),
    ("  \nThe correct answer is (A)\n", "A"),
    ("the correct answer is (A)", "A"),  # case-sensitive: no match
    ("The correct answer is (E)", "A"),
    ("The correct answer is (a)", "A"),
    ("The correct answer is (A). Wait, no: The correct answer is (B).", "B"),  # the first match wins
    ("The correct answer is B, or rather The correct answer is (C)", "C"),  # a parenthesised match wins anywhere
    ("The correct answer is *(D)*", "D"),  # asterisks removed first
    ("The correct answer is (insert answer here)", "A"),
    ("The correct answer is Answer A", "A"),  # the bare rule reads the 'A' of 'Answer'
    ("The correct answer is (B", "B"),
    ("The correct answer is  (B)", "B"),  # two spaces: neither rule
    ("The correct answer is\n(B)", "B"),
    ("", "A"),
    ("I think it is (C).", "C"),
    ("Based on the text, The correct answer is (D) because the pier was surveyed.", "D"),
    ("The correct answer is (A)(B)", "B"),
    ("The correct answer is AB", "A"),
    ("The correct answer is: (C)", "C"),
    ("**The correct answer is** **(B)**", "B"),
    ("The correct answer is (C)\nThe correct answer is (C)", "C"),
]

DIFFICULTIES = ["easy", "hard"]
LENGTHS = ["short", "medium", "long"]
STYLES = ["The correct answer is ({})", "The correct answer is {}", "I cannot tell.", "**The correct answer is ({})**",
          "Maybe ({})"]


def extract_answer_from(pred_py: Path):
    """pred.py's extract_answer, compiled from its own source (with the ``re`` module it uses)."""
    # pred.py imports its API clients at the top, so the function alone is written into a module of its own and
    # imported from there (the official source, unchanged)
    import importlib.util
    import tempfile

    tree = ast.parse(pred_py.read_text("utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "extract_answer")
    module_file = Path(tempfile.mkdtemp()) / "official_extract_answer.py"
    module_file.write_text("import re\n\n\n" + ast.unparse(fn) + "\n", "utf-8")
    spec = importlib.util.spec_from_file_location("official_extract_answer", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.extract_answer


def prediction_lists(extract) -> list[dict]:
    """Seeded prediction lists with every bucket filled, plus a few hand-made ones."""
    rng = random.Random(20241220)
    cases = []
    for i in range(12):
        n = rng.randint(6, 40)
        items = []
        for j in range(n):
            answer = rng.choice("ABCD")
            style = rng.choice(STYLES)
            letter = answer if rng.random() < 0.45 else rng.choice("ABCD")
            items.append({"difficulty": DIFFICULTIES[j % 2] if j < 6 else rng.choice(DIFFICULTIES),
                          "length": LENGTHS[j % 3] if j < 6 else rng.choice(LENGTHS),
                          "answer": answer, "response": style.format(letter)})
        cases.append({"name": f"seeded_{i:02d}", "compensated": i % 4 == 3, "items": items})
    cases.append({"name": "all_right", "compensated": False, "items": [
        {"difficulty": d, "length": length, "answer": "A", "response": "The correct answer is (A)"}
        for d in DIFFICULTIES for length in LENGTHS]})
    cases.append({"name": "none_extracted_compensated", "compensated": True, "items": [
        {"difficulty": d, "length": length, "answer": "B", "response": "no idea"}
        for d in DIFFICULTIES for length in LENGTHS]})
    for case in cases:
        for item in case["items"]:
            item["pred"] = extract(item["response"].strip())
            item["judge"] = item["pred"] == item["answer"]
    return cases


def run_result_py(result_py: Path, cases: list[dict], compensated: bool) -> dict[str, dict[str, float]]:
    source = result_py.read_text("utf-8")
    if compensated:
        assert source.count("compensated = False") == 1, "result.py's compensated switch moved"
        source = source.replace("compensated = False", "compensated = True")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results").mkdir()
        for case in cases:
            keys = ("difficulty", "length", "pred", "judge")
            items = [{k: item[k] for k in keys} for item in case["items"]]
            (Path(tmp) / "results" / f"{case['name']}.json").write_text(json.dumps(items), "utf-8")
        # result.py reads results/ and writes result.txt in its working directory: run it there as a script
        (Path(tmp) / "result.py").write_text(source, "utf-8")
        subprocess.run([sys.executable, "result.py"], cwd=tmp, check=True, capture_output=True)
        lines = (Path(tmp) / "result.txt").read_text("utf-8").splitlines()
    header = [h.lower() for h in lines[0].split("\t")[1:]]
    out = {}
    for line in lines[1:]:
        name, *values = line.split("\t")
        out[name] = dict(zip(header, map(float, values)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="THUDM/LongBench repository root (pred.py, result.py)")
    parser.add_argument("--commit", default=None, help="the checkout's commit (default: git rev-parse HEAD)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    root = args.checkout
    commit = args.commit or subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    extract = extract_answer_from(root / "pred.py")
    extract_cases = []
    for response, answer in RESPONSES:
        pred = extract(response.strip())  # get_pred: response = output.strip(); extract_answer(response)
        extract_cases.append({"response": response, "answer": answer, "pred": pred, "judge": pred == answer})
    cases = prediction_lists(extract)
    for compensated in (False, True):
        chosen = [c for c in cases if c["compensated"] is compensated]
        table = run_result_py(root / "result.py", chosen, compensated)
        for case in chosen:
            case["expected"] = table[case["name"]]
    sha = {name: hashlib.sha256((root / "prompts" / f"{name}.txt").read_bytes()).hexdigest()
           for name in ("0shot", "0shot_cot", "0shot_cot_ans")}
    fixture = {"source": "THUDM/LongBench pred.py extract_answer + result.py (v2, repository root)",
               "repo": "THUDM/LongBench", "commit": commit, "template_sha256": sha,
               "extract_cases": extract_cases, "aggregate_cases": cases}
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", "utf-8")
    print(f"wrote {args.out}: {len(extract_cases)} extract cases, {len(cases)} aggregate cases")


if __name__ == "__main__":
    main()
