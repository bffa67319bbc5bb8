"""The reference model's bars (kvbench issue #28), measured through the real runner on evaluation seeds.

    python scripts/reference_check.py [--model-path DIR] [--n 20] [--seed 0] [--threads 2] [--out DIR] [--ranking]

For a checkpoint dir (default: the shipped ``harness/reference/checkpoint``) it runs ``harness.runner.run`` on
configs composed exactly as ``kvbench`` composes them (``model=reference model.path=DIR``, RULER's official
length rule, query-agnostic compression, greedy decoding), so every number is what ``kvbench`` prints for the same
overrides, and prints, with PASS/FAIL against the issue's thresholds:

- the full-cache score of each offline RULER task at 4k (>= 85): the 11 tasks that need no downloaded data
  (qa_1 / qa_2 read SQuAD / HotpotQA; the essay haystack of niah_single_2/3 and niah_multikey_1 falls back to the
  shipped prose without ``task.data_dir``), and at 8k on niah_single_1/2 and vt (>= 80);
- query-agnostic SnapKV at keep 0.25 against random at 0.25 on niah_single_1/2/3 (SnapKV >= random + 30 on each);
- ExpectedAttention against random at each of ``--ratios`` (mean over ``--ea-tasks``; strictly greater at each);
- the seconds per niah_single_1 sample at 4k with the full cache (prefill + decode, the rows' own timings; <= 1 s
  on 2 cores: meaningful only on an otherwise idle machine).

``--ranking`` adds StreamingLLM, Knorm and TOVA at ``--ratios`` on niah_single_1/2/3 and prints the methods
ranked by mean score, for comparison with the kvpress leaderboard's order (conf/paper/kvpress_ruler4k.yaml).
Samples come from ``--seed`` (< 1000: evaluation seeds; training uses >= 1_000_000). Exit status 0 when every bar
holds, 1 when one fails, 2 for a bad argument.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.errors import KvbenchError  # noqa: E402

# The thresholds (kvbench issue #28).
FULL_4K_MIN, FULL_8K_MIN, SNAP_MARGIN, SECONDS_4K_MAX = 85.0, 80.0, 30.0, 1.0
OFFLINE = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
           "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
NEEDS_DATA = ("qa_1", "qa_2")  # RULER's QA tasks read SQuAD / HotpotQA (tasks/ruler/qa.py)
AT_8K = ("niah_single_1", "niah_single_2", "vt")
SNAP_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3")
SNAP_RATIO = 0.25
RANKING_METHODS = ("streaming_llm", "knorm", "tova")
EVAL_SEEDS = 1000  # evaluation seeds are < 1000 (harness/reference/data.py, tasks/ruler/common.py)


def compose(overrides: list[str]):
    import conf
    from harness.overrides import Composer

    with Composer(conf.CONF_DIR, "config") as composer:
        return composer.compose(overrides)


def suite_overrides(names: tuple[str, ...] | list[str]) -> list[str]:
    """``task=ruler`` restricted to ``names`` through ``task.exclude`` (one run, rows named per task)."""
    from tasks.ruler.templates import TASK_NAMES

    left_out = [t for t in TASK_NAMES if t not in names]
    return ["task=ruler", f"task.exclude=[{','.join(left_out)}]"]


def run_rows(out: Path, name: str, overrides: list[str]) -> list[dict]:
    """One runner run into ``out/name``; its rows (a failed row is an error: the check needs every score)."""
    from harness.runner import run

    run_dir = out / name
    started = time.perf_counter()
    run(compose(overrides), run_dir)
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    failed = [r for r in rows if r.get("error")]
    if failed:
        raise KvbenchError(f"{run_dir}: {len(failed)} rows failed, e.g. {failed[0]['error']}")
    print(f"  ran {name}: {len(rows)} rows in {time.perf_counter() - started:.0f}s", flush=True)
    return rows


def scores(rows: list[dict]) -> dict[tuple[str, str, float], float]:
    """Mean score x100 per (method, short task name, keep ratio)."""
    groups: dict[tuple[str, str, float], list[float]] = {}
    for r in rows:
        key = (r["method"], r["task"].removeprefix("ruler/"), round(float(r["keep_ratio"]), 6))
        groups.setdefault(key, []).append(float(r["score"]))
    return {k: 100 * statistics.fmean(v) for k, v in groups.items()}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def check(model_path: str | None, n: int, seed: int, ratios: list[float], ea_tasks: list[str], out: Path,
          ranking: bool = False, full: bool = True) -> tuple[list[str], bool]:
    """The report's lines and whether every bar holds."""
    common = ["model=reference", f"n_samples={n}", f"seed={seed}", "query_aware=false", "progress=false"]
    if model_path:
        common.append(f"model.path={model_path}")
    at_4k = [*common, "context_length=4096"]
    results: dict = {}
    if full:
        rows_4k = run_rows(out, "full_4k", [*at_4k, *suite_overrides(OFFLINE), "method=full", "keep_ratio=1.0"])
        results.update(scores(rows_4k))
        full_8k = scores(run_rows(out, "full_8k", [*common, "context_length=8192", *suite_overrides(AT_8K),
                                                   "method=full", "keep_ratio=1.0"]))
    keep = f"keep_ratio=[{','.join(f'{r:g}' for r in sorted({*ratios, SNAP_RATIO}))}]"
    compressed_tasks = sorted({*SNAP_TASKS, *ea_tasks})
    results.update(scores(run_rows(out, "random", [*at_4k, *suite_overrides(compressed_tasks), "method=random",
                                                   keep])))
    # SnapKV at every ratio (one prefill serves them all): the 0.25 bar, and the ranking's row
    results.update(scores(run_rows(out, "snapkv", [*at_4k, *suite_overrides(SNAP_TASKS), "method=snapkv", keep])))
    ea_keep = f"keep_ratio=[{','.join(f'{r:g}' for r in ratios)}]"
    results.update(scores(run_rows(out, "expected_attention", [*at_4k, *suite_overrides(compressed_tasks),
                                                               "method=expected_attention", ea_keep])))
    if ranking:
        for method in RANKING_METHODS:
            results.update(scores(run_rows(out, method, [*at_4k, *suite_overrides(SNAP_TASKS), f"method={method}",
                                                         ea_keep])))

    lines, all_ok = [], True
    lines.append(f"model: {model_path or 'harness/reference/checkpoint (shipped)'}; n={n} per task, seed={seed}, "
                 "RULER length rule, query-agnostic")
    lines.append("")
    if full:
        all_ok &= _full_lines(lines, results, full_8k, rows_4k)
    else:
        all_ok = False
        lines.append("full cache: not run (--skip-full); overall cannot pass")
    all_ok &= _compressed_lines(lines, results, ratios, ea_tasks, ranking)
    lines.append("")
    lines.append(f"overall: {verdict(all_ok)}")
    return lines, all_ok


def _full_lines(lines: list[str], results: dict, full_8k: dict, rows_4k: list[dict]) -> bool:
    all_ok = True
    lines.append(f"full cache, 4k (>= {FULL_4K_MIN:g} each):")
    for t in OFFLINE:
        s = results[("full", t, 1.0)]
        all_ok &= s >= FULL_4K_MIN
        lines.append(f"  {t:<16} {s:6.1f}  {verdict(s >= FULL_4K_MIN)}")
    lines.append(f"  {'mean':<16} {statistics.fmean(results[('full', t, 1.0)] for t in OFFLINE):6.1f}")
    lines.append(f"full cache, 8k (>= {FULL_8K_MIN:g} each):")
    for t in AT_8K:
        s = full_8k[("full", t, 1.0)]
        all_ok &= s >= FULL_8K_MIN
        lines.append(f"  {t:<16} {s:6.1f}  {verdict(s >= FULL_8K_MIN)}")
    timed = [r for r in rows_4k if r["task"] == "ruler/niah_single_1"]
    seconds = statistics.median(r["prefill_s"] + r["compress_s"] + r["decode_s"] for r in timed)
    lines.append(f"seconds per niah_single_1 sample at 4k, full cache (median prefill + decode; <= "
                 f"{SECONDS_4K_MAX:g} s on 2 idle cores): {seconds:.2f}  {verdict(seconds <= SECONDS_4K_MAX)}")
    return all_ok and seconds <= SECONDS_4K_MAX


def _compressed_lines(lines: list[str], results: dict, ratios: list[float], ea_tasks: list[str],
                      ranking: bool) -> bool:
    all_ok = True
    lines.append(f"SnapKV vs random at keep {SNAP_RATIO:g}, query-agnostic (SnapKV >= random + {SNAP_MARGIN:g}):")
    for t in SNAP_TASKS:
        snap, rand = results[("snapkv", t, SNAP_RATIO)], results[("random", t, SNAP_RATIO)]
        ok = snap >= rand + SNAP_MARGIN
        all_ok &= ok
        lines.append(f"  {t:<16} snapkv {snap:6.1f}  random {rand:6.1f}  diff {snap - rand:+6.1f}  {verdict(ok)}")
    lines.append(f"ExpectedAttention vs random, mean over {', '.join(ea_tasks)} (EA > random at each ratio):")
    for r in ratios:
        ea = statistics.fmean(results[("expected_attention", t, r)] for t in ea_tasks)
        rand = statistics.fmean(results[("random", t, r)] for t in ea_tasks)
        all_ok &= ea > rand
        per_task = " ".join(f"{t}={results[('expected_attention', t, r)]:.0f}/{results[('random', t, r)]:.0f}"
                            for t in ea_tasks)
        lines.append(f"  keep {r:<5g} EA {ea:6.1f}  random {rand:6.1f}  diff {ea - rand:+6.1f}  {verdict(ea > rand)}"
                     f"   ({per_task}, EA/random)")
    if ranking:
        methods = ["snapkv", "expected_attention", "random", *RANKING_METHODS]
        table = {}
        for m in methods:
            table[m] = statistics.fmean(results[(m, t, r)] for t in SNAP_TASKS for r in ratios)
        lines.append(f"ranking on {', '.join(SNAP_TASKS)}, mean over keep {', '.join(f'{r:g}' for r in ratios)}:")
        for i, (m, s) in enumerate(sorted(table.items(), key=lambda kv: -kv[1]), start=1):
            lines.append(f"  {i}. {m:<20} {s:6.1f}")
    return all_ok


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvbenchError(f"--ratios={text!r} is not a comma list of numbers; allowed: keep ratios in (0, 1)") \
            from None
    bad = [r for r in ratios if not (math.isfinite(r) and 0 < r < 1)]
    if not ratios or bad:
        raise KvbenchError(f"--ratios={text!r} holds {bad[0] if bad else 'no ratio'}; allowed: keep ratios in (0, 1), "
                           "e.g. 0.1,0.25,0.5")
    return sorted(set(ratios))


def parse_tasks(text: str) -> list[str]:
    names = [x.strip().removeprefix("ruler/") for x in text.split(",") if x.strip()]
    bad = [t for t in names if t not in OFFLINE]
    if not names or bad:
        raise KvbenchError(f"--ea-tasks={text!r} names {bad[0] if bad else 'no task'!r}; allowed: "
                           + ", ".join(OFFLINE))
    return list(dict.fromkeys(names))


def main(argv=None) -> int:
    import torch

    from harness.cli import ArgumentParser

    ap = ArgumentParser(prog="kvbench", description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None, help="a checkpoint dir (default: the shipped reference model)")
    ap.add_argument("--n", type=int, default=20, help="samples per task and length")
    ap.add_argument("--seed", type=int, default=0, help=f"evaluation seed, < {EVAL_SEEDS}")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--ratios", default="0.1,0.25,0.5", help="keep ratios of the ExpectedAttention check")
    ap.add_argument("--ea-tasks", default=",".join(SNAP_TASKS), help="tasks of the ExpectedAttention check")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary dir, removed)")
    ap.add_argument("--json", default=None, help="also write the report lines here")
    ap.add_argument("--ranking", action="store_true", help="also StreamingLLM, Knorm, TOVA, and a ranking")
    ap.add_argument("--skip-full", action="store_true",
                    help="only the compressed runs (a quick attention check of a pilot; overall then fails)")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 100_000:
        ap.error(f"--n={args.n} is out of range; allowed: 1 to 100000")
    if not 0 <= args.seed < EVAL_SEEDS:
        ap.error(f"--seed={args.seed} is not an evaluation seed; allowed: 0 to {EVAL_SEEDS - 1} "
                 "(training uses >= 1000000)")
    if not 1 <= args.threads <= 1024:
        ap.error(f"--threads={args.threads} is out of range; allowed: 1 to 1024")
    try:
        ratios = parse_ratios(args.ratios)
        ea_tasks = parse_tasks(args.ea_tasks)
        if args.model_path is not None and not (Path(args.model_path) / "config.json").is_file():
            raise KvbenchError(f"--model-path={args.model_path!r} has no config.json; pass a checkpoint dir "
                               "(python -m harness.reference.train --out DIR writes one)")
        if args.out is not None and Path(args.out).exists() and any(Path(args.out).iterdir()):
            raise KvbenchError(f"--out={args.out!r} is not empty; pass a new or empty dir")
        torch.set_num_threads(args.threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per run would bury the report
        started = time.perf_counter()
        if args.out is None:
            with tempfile.TemporaryDirectory(prefix="kvbench-reference-check-") as tmp:
                lines, ok = check(args.model_path, args.n, args.seed, ratios, ea_tasks, Path(tmp), args.ranking,
                                  not args.skip_full)
        else:
            lines, ok = check(args.model_path, args.n, args.seed, ratios, ea_tasks, Path(args.out), args.ranking,
                              not args.skip_full)
    except KvbenchError as err:
        ap.exit(2, f"kvbench: error: {err}\n")
    lines.append(f"took {time.perf_counter() - started:.0f}s with {args.threads} threads")
    print("\n".join(lines))
    if args.json:
        from harness.io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"lines": lines, "pass": ok}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
