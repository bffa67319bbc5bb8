"""Regenerate tests/fixtures/infinitebench/metric_cases.json by running the official InfiniteBench code.

    python tools/official/dump_infinitebench_metrics.py <InfiniteBench checkout> [--rouge-script PATH] [--out FILE]

<InfiniteBench checkout>: a clone of github.com/OpenBMB/InfiniteBench (the fixture was made at 88b3daa); its
src/compute_scores.py scores every case (``get_score_one``) and its src/eval_utils.py builds the prompts
(``create_prompt``) and labels (``get_answer``) of the records in tests/fixtures/infinitebench/. Run it in an
environment with the official code's dependencies (rouge==1.0.1, jieba, evaluate, rouge_score, tqdm), not kvbench's.

compute_scores.py calls ``evaluate.load("rouge")`` at import, which fetches the metric script from the Hugging Face
hub; offline, pass ``--rouge-script`` the file metrics/rouge/rouge.py of github.com/huggingface/evaluate and it is
loaded from there instead (the same script).

Only numbers and hashes of the official outputs are written: the cases (task, prediction, official label) and the
official score of each; per fixture record and prompt family, the official label and the SHA-256 of the official
prompt (or the error the official code raises for it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "infinitebench"
FAMILY_MODEL = {"yarn_mistral": "yarn-mistral", "gpt4": "gpt4", "claude2": "claude2"}  # MODEL_TO_PROMPT_TEMPLATE keys

UUID = "5e6b7b90-710d-4953-9b18-3e96b2cadbf2"
SUMMARY = ("Mira and her brother Tobin keep the lighthouse of Vell.\nA stranger, Doctor Reyes, rents a room; during a "
           "storm the lighthouse saves eleven sailors.\nThe doctor leaves a telescope and a letter for their mother.")

# (task, prediction, label): the label as eval_utils.get_answer returns it for a hub record.
CASES = [
    *[("passkey", p, "71432") for p in (
        "71432.", "The pass key is 71432", " 71432 is the key", "7143", "714321", "The key 12345 then 71432", "",
        "abc", "71,432", "\u0667\u0661\u0664\u0663\u0662", "\n71432\n", "0071432")],
    ("passkey", "71432", ["71432"]),
    *[("number_string", p, "3000077442") for p in (
        "3000077442", "30000\nThe grass is green. 3000077442", "The sequence of digits is 3000077442.", "300007744",
        "30000774422", "3000077442 3000077442", "", "digits: 3000-077442", "x3000077442y", "03000077442")],
    ("number_string", "3000077442", ["3000077442"]),
    *[("kv_retrieval", p, UUID) for p in (
        UUID, f'"{UUID}"', f"The value is: {UUID}", f"{UUID}.", f"{UUID}-extra", "{" + UUID + "}", f"key{UUID}",
        "", f"({UUID})", f"value: {UUID};", f"abc {UUID} def", UUID.upper(), f"'{UUID}'\n\nKey: \"x\"")],
    *[("longbook_sum_eng", p, [SUMMARY]) for p in (
        SUMMARY, SUMMARY.replace("\n", " "), "Mira and Tobin keep a lighthouse.", "", "...", "MIRA AND HER BROTHER",
        "The lighthouse saves eleven sailors.\nThe doctor leaves a telescope.", "the the the the lighthouse lighthouse",
        "Doctor Reyes rents a room in 1912; 11 sailors saved.", "Une histoire de phare: Mira et Tobin.",
        "a\nb\n\nc lighthouse\n")],
    ("longbook_sum_eng", "Wren keeps bees.", ["Wren Ashgrove keeps bees in the orchard.", "Felix wants to sell."]),
    ("longbook_sum_eng", "Felix wants to sell the orchard.", ["Wren Ashgrove keeps bees.", "Felix wants to sell it."]),
    *[("longbook_choice_eng", p, ["Walking Georgie", "A"]) for p in (
        "A", "B", "Walking Georgie", "The answer is: A", "answer is B", "I think the answer is Walking Georgie.",
        "Option C", "It is D", "maybe A", "", "   A. Walking", "AB", "The answer:", "BC then A", "Walking")],
    ("longbook_choice_eng", "Dear reader,\n\nThe answer to your question is C. Snowfield.", ["Snowfield", "C"]),
    ("longbook_choice_eng", ":\n\n\n\n", ["Snowfield", "C"]),
    *[("longbook_qa_eng", p, ["fighting in world war 1"]) for p in (
        "fighting in world war 1", "Cael Bronwyn dies fighting in World War 1.", "world war", "", "The war.",
        "fighting, fighting, fighting", "an accident at sea", "World-War 1 fighting", "WWI")],
    ("longbook_qa_eng", "at the market in Dunmere", ["at the Saturday market in Dunmere", "Dunmere"]),
    ("longbook_qa_eng", "Dunmere", ["at the Saturday market in Dunmere", "Dunmere"]),
    ("longbook_qa_eng", "stockings", ["stockings"]),
    *[("longbook_qa_chn", p, ["田立帆，商老太，王剑英"]) for p in (
        "田立帆，商老太，王剑英", "\n1. 田立帆\n2. 商老太", "王剑英", "", "胡一刀", "田立帆、商老太、王剑英、王剑杰",
        "Tian Lifan", "田 立 帆", "商老太商老太")],
    ("longbook_qa_chn", "铁匠", ["铁匠", "打铁的"]),
    ("longbook_qa_chn", "他是打铁的。", ["铁匠", "打铁的"]),
    *[("longdialogue_qa_eng", p, ["ACE", "ACE ROTHSTEIN"]) for p in (
        "ACE", "ace.", "GREEN.\n\nACE is on the phone", "ACE ROTHSTEIN", "Ace's", "ROTHSTEIN", "", "MACE", "ACE:",
        "ACE-ROTHSTEIN", "to be 'Philip Green'.")],
    ("longdialogue_qa_eng", "Remo", ["Remo", "GAGGI"]),
    ("longdialogue_qa_eng", "GAGGI", ["GAGGI", "Remo", "remo Gaggi"]),
    *[("math_find", p, [88]) for p in (
        "88", "The answer is 88", "8", "-88", "", "88, 99", "1 88", "88\n\nThe smallest number of the list is: 1",
        "eighty-eight")],
    ("math_find", "94", 94),
    ("math_find", "55.5", [55.5]),
    ("math_find", "55", [55.5]),
    ("math_find", "55", [55.0]),
    ("math_find", "The median is 55.0", [55.0]),
    *[("math_calc", p, [17, 14, 20]) for p in (
        "[17, 14, 20]", "17, 14, 21", "", "12, 17, 14", "17 14 20 99", "Values: [17, -14, 20]", "17", "[17, 14]",
        "1714 20")],
    ("math_calc", "[17, 14, 20]", [[17, 14, 20]]),
    ("math_calc", "3, 5", [3, 5, 9, 2]),
    *[("code_run", p, 4) for p in (
        "4", "The return value is: 4", "4.", "4\n\n", "10.", "-4", "four", "", "4 apples", "`4`", "The value is 4:")],
    ("code_run", "The value is -4", -4),
    ("code_run", "4", [4]),
    *[("code_debug", p, ["repack_carchive", "B"]) for p in (
        "B", "B. repack_carchive", "B:", "The correct option is: B", "The answer is: repack_carchive", "answer: C",
        "Option B", "\n\n    A. repack_carchive", "The answer is:", "the function is: `repack_carchive`",
        "\n\n    A\n    B\n    C\n    D", "answer is: Option B")],
    ("code_debug", "C. Configer._set_option", ["Configer._set_option", "C"]),
]


def load_official(checkout: Path, rouge_script: Path | None):
    sys.path.insert(0, str(checkout / "src"))
    if rouge_script is not None:
        import evaluate

        load = evaluate.load

        def load_local(path, *args, **kwargs):
            return load(str(rouge_script) if path == "rouge" else path, *args, **kwargs)

        evaluate.load = load_local
    import compute_scores  # noqa: E402 - the official module, from the checkout
    import eval_utils

    return compute_scores, eval_utils


def records(task: str) -> list[dict]:
    path = FIXTURES / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--rouge-script", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=FIXTURES / "metric_cases.json")
    args = parser.parse_args()
    compute_scores, eval_utils = load_official(args.checkout.resolve(), args.rouge_script)
    commit = subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None

    metric_cases = []
    for task, prediction, label in CASES:
        expected = compute_scores.get_score_one(prediction, label, task, "yarn-mistral")
        metric_cases.append({"task": task, "prediction": prediction, "label": label, "expected": expected})

    record_cases = []
    for task in compute_scores.ALL_TASKS:
        for index, record in enumerate(records(task)):
            case = {"task": task, "index": index, "label": eval_utils.get_answer(dict(record), task), "prompts": {}}
            for family, model in FAMILY_MODEL.items():
                try:
                    prompt = eval_utils.create_prompt(dict(record), task, model, str(FIXTURES))
                    case["prompts"][family] = {"sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
                                               "chars": len(prompt)}
                except Exception as err:  # noqa: BLE001 - recorded: kvbench documents what it does there
                    case["prompts"][family] = {"error": f"{type(err).__name__}: {err}"}
            record_cases.append(case)

    out = {
        "source": {"repo": "OpenBMB/InfiniteBench", "commit": commit,
                   "scored_by": "src/compute_scores.py get_score_one(pred, label, task, 'yarn-mistral')",
                   "prompts_by": "src/eval_utils.py create_prompt / get_answer on tests/fixtures/infinitebench/*.jsonl",
                   "rouge": "evaluate's metrics/rouge/rouge.py on rouge_score"},
        "metric_cases": metric_cases,
        "record_cases": record_cases,
    }
    args.out.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(metric_cases)} metric cases, {len(record_cases)} records")


if __name__ == "__main__":
    main()
