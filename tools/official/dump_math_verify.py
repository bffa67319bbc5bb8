"""Regenerate tests/fixtures/math/verify_cases.json: math-verify's own verdicts on fixed answer-check cases.

    python tools/official/dump_math_verify.py [--out PATH]

Runs the installed ``math_verify`` (PyPI math-verify; its version is recorded) and nothing of kvbench. Each case
has the dataset's ``gold`` answer, a model ``prediction``, whether the prompt opened a ``<think>`` block, and
``answer_text``: the part of the prediction the answer is to be extracted from, written out by hand (the thinking
removed as docs/math.md says; kvbench's ``answer_part`` is tested against it). The verdict is::

    verify(parse("\\boxed{" + gold + "}", [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]),
           parse(answer_text, [LatexExtractionConfig(), ExprExtractionConfig()]))

the call kvbench's metric makes (tasks/math/metrics.py). The answers and predictions are ours, not AIME or MATH
problems.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "math" / "verify_cases.json"

# (name, gold, prediction, prompt_opens_think, answer_text)
CASES = [
    ("fraction_boxed", "\\frac{3}{4}", "So the probability is \\boxed{\\frac{3}{4}}.", False, None),
    ("fraction_as_decimal", "\\frac{3}{4}", "The answer is \\boxed{0.75}.", False, None),
    ("decimal_gold_fraction_pred", "0.5", "Hence \\boxed{\\frac12}.", False, None),
    ("fraction_vs_short_decimal", "\\frac{1}{3}", "Roughly \\boxed{0.333}.", False, None),
    ("fraction_vs_long_decimal", "\\frac{14}{3}", "The length is $4.6666667$.", False, None),
    ("fraction_wrong", "\\frac{3}{4}", "\\boxed{\\frac{4}{3}}", False, None),
    ("list_reordered", "2, 3", "The roots are \\boxed{3, 2}.", False, None),
    ("set_reordered", "\\{1, 2\\}", "\\boxed{\\{2, 1\\}}", False, None),
    ("tuple_same", "(3, \\frac{\\pi}{2})", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", False, None),
    ("tuple_swapped", "(3, \\frac{\\pi}{2})", "\\boxed{\\left( \\frac{\\pi}{2}, 3 \\right)}", False, None),
    ("interval_same", "(2,\\infty)", "So $x \\in \\boxed{(2, \\infty)}$.", False, None),
    ("interval_wrong_bracket", "[-2,7)", "\\boxed{(-2,7)}", False, None),
    ("units_in_text", "10", "The side is \\boxed{10\\text{ cm}}.", False, None),
    ("text_answer", "\\text{Evelyn}", "The winner is \\boxed{\\text{Evelyn}}.", False, None),
    ("letter_choice", "\\text{(C)}", "\\boxed{C}", False, None),
    ("plain_number_no_box", "24", "The final answer is 24.", False, None),
    ("leading_zero_gold", "025", "\\boxed{25}", False, None),
    ("integer_wrong", "24", "\\boxed{42}", False, None),
    ("no_answer", "24", "I could not finish.", False, None),
    ("two_boxed_answers_are_one_set", "24", "First guess \\boxed{7}, corrected: \\boxed{24}", False, None),
    ("sqrt_equivalent", "3\\sqrt{3}", "\\boxed{\\sqrt{27}}", False, None),
    ("polynomial_factored", "x^2+2x+1", "\\boxed{(x+1)^2}", False, None),
    ("percent_same", "50\\%", "\\boxed{50\\%}", False, None),
    ("percent_vs_fraction", "50\\%", "\\boxed{\\frac{1}{2}}", False, None),
    ("dollar_sign_gold", "\\$18.90", "It costs \\boxed{\\$18.90}.", False, None),
    ("pi_numeric", "2\\pi", "\\boxed{6.283185}", False, None),
    ("think_closed_right_after", "24", "<think>Try 7? \\boxed{7} no.</think>\n\nThe answer is \\boxed{24}.", False,
     "\n\nThe answer is \\boxed{24}."),
    ("think_closed_wrong_after", "24", "<think>It is \\boxed{24}.</think>\\boxed{25}", False, "\\boxed{25}"),
    ("think_two_blocks", "24", "<think>a \\boxed{1}</think>so \\boxed{24}<think>check \\boxed{2}</think>", False,
     "so \\boxed{24}"),
    ("think_unclosed_whole_text", "24", "<think>\nWe get \\boxed{24} after the long", False,
     "<think>\nWe get \\boxed{24} after the long"),
    ("template_opened_then_closed", "24", "reasoning gives \\boxed{3}</think>\n\n\\boxed{24}", True, "\n\n\\boxed{24}"),
    ("template_opened_never_closed", "24", "reasoning \\boxed{24} and then it stops", True,
     "reasoning \\boxed{24} and then it stops"),
    ("stray_close_without_open", "24", "scratch \\boxed{5}</think>Answer: \\boxed{24}", False, "Answer: \\boxed{24}"),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    pred_cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    cases = []
    for name, gold, prediction, opens, answer_text in CASES:
        answer_text = prediction if answer_text is None else answer_text
        g = parse("\\boxed{" + gold + "}", gold_cfg)
        p = parse(answer_text, pred_cfg)
        cases.append({"name": name, "gold": gold, "prediction": prediction, "prompt_opens_think": opens,
                      "answer_text": answer_text, "gold_parsed": [str(x) for x in g],
                      "prediction_parsed": [str(x) for x in p], "verify": bool(verify(g, p))})
    out = {"library": "math-verify", "version": importlib.metadata.version("math-verify"),
           "latex2sympy2_extended": importlib.metadata.version("latex2sympy2_extended"),
           "call": "verify(parse('\\\\boxed{' + gold + '}', [LatexExtractionConfig(boxed_match_priority=0), "
                   "ExprExtractionConfig()]), parse(answer_text, [LatexExtractionConfig(), ExprExtractionConfig()]))",
           "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", "utf-8")
    print(f"{len(cases)} cases, {sum(c['verify'] for c in cases)} verified -> {args.out}")


if __name__ == "__main__":
    main()
