"""H2O's scoring cost against the prefill it scores (issue 27: "attention-sum scoring at <= 2x the prefill").

On the reference model (or ``--model``), random prompts of each length: per repeat, one plain prefill (method
full) and one H2O prefill back to back, paired; prints the median over repeats of the prefill time and of H2O's
scoring time (``score_s``: the column sums of every layer, measured by the harness; the attention pass that also
returns each row's log-sum-exp is H2O's prefill, as for any prefill), their ratio and its quartiles, and the
machine. The column sums take ``methods._attention._prefill_column_sums`` on CPU.

    python benchmarks/h2o_scoring.py --lengths 2048 4096 8192 16384 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

import kvbench  # noqa: E402
from harness.attention import install  # noqa: E402
from harness.pipeline import prefill  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tok = kvbench.load_model(args.model)
    full, h2o = kvbench.method("full"), kvbench.method("h2o", keep_ratio=0.25)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with install(model) as hooks:
        for length in args.lengths:
            ids = torch.randint(10, len(tok), (length,), generator=gen).tolist()
            prefill(model, hooks, ids, full, seed=0)  # warm-up
            plain, scoring = [], []
            for _ in range(args.repeats):
                plain.append(prefill(model, hooks, ids, full, seed=0).prefill_s)
                done = prefill(model, hooks, ids, h2o, seed=0)
                scoring.append(done.score_s)
            ratios = sorted(s / p for s, p in zip(scoring, plain))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            rows.append({"length": length, "prefill_s": statistics.median(plain),
                         "h2o_score_s": statistics.median(scoring), "score_vs_prefill": statistics.median(ratios),
                         "quartiles": [round(q[0], 2), round(q[-1], 2)]})
            print(json.dumps(rows[-1]), flush=True)
    print("machine:", json.dumps(machine()))


if __name__ == "__main__":
    main()
