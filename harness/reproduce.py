"""``kvbench-reproduce <paper> [options] [overrides...]``: run a paper preset's grid, then the report.

A preset (``conf/paper/<name>.yaml``, a ``# @package _global_`` config of group ``paper``) sets keep ratios,
context length, sample count and a ``paper`` node: ``grid`` (models x methods x tasks x context lengths, each
model and method with its own overrides), ``published`` (numbers with their source, null where unknown) and
``notes``. For each grid model and method this runs::

    kvbench -m paper=<name> method=<method> [method.label=<label>] <method overrides> task=<t1,t2,...>
        context_length=<c1,...> <model overrides> <your overrides> hydra.sweep.dir=<out>/<name>/<model label>

(one prefill serves all keep ratios of a job; reruns skip finished rows), then ``kvbench-report <out>/<name>``,
which writes ``published.{md,tex,csv}``: ours beside the published numbers.

A grid task is a task name (run at the grid's ``context_length`` list) or ``{name: <task>, context_length: [...],
overrides: [...]}`` for a task the paper ran at its own lengths or settings (LongBench whole and without its
Chinese tasks, RULER at 4k): each distinct (lengths, overrides) is one job per model and method. The preset's
published cells are checked when it loads (``harness.published.check_published``): a cell without a source, or
with a number but no configuration, is refused with one line.

Overrides on the command line go to every job. ``model=...`` (with ``model.*``) replaces the grid's models by
that one model: ``model=reference`` runs the grid offline on a stand-in for a quick check (the report then shows
the stand-in's numbers beside the paper's, marked so). Before anything runs, every job's config is composed and
its method built, so a preset naming a method, task or model that does not exist fails at once, with one line.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from harness.errors import KvbenchError

from conf import CONF_DIR


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "paper").glob("*.yaml") if not p.name.startswith("_"))


def task_name(entry) -> str:
    """A grid task entry's task name (a name, or ``{name, context_length, overrides}``)."""
    return str(entry["name"]) if isinstance(entry, dict) else str(entry)


def task_groups(grid: dict) -> list[tuple[list[str], list[int], list[str]]]:
    """The grid's tasks grouped by the context lengths and task overrides they run with, in order of first
    appearance: ``[(task names, context lengths, overrides)]``; a plain name takes ``grid.context_length``."""
    groups: dict[tuple[tuple[int, ...], tuple[str, ...]], list[str]] = {}
    for entry in grid["tasks"]:
        own = entry.get("context_length") if isinstance(entry, dict) else None
        lengths = tuple(int(c) for c in (own if own is not None else grid["context_length"]))
        extra = tuple(str(o) for o in (entry.get("overrides") or [])) if isinstance(entry, dict) else ()
        groups.setdefault((lengths, extra), []).append(task_name(entry))
    return [(names, list(lengths), list(extra)) for (lengths, extra), names in groups.items()]


def _fmt_list(values) -> str:
    return "[" + ",".join(str(float(v)) for v in values) + "]"


def _missing(raw: dict, grid: dict, with_defaults: bool) -> list[str]:
    """conf/ files a preset needs that do not exist: its grid's methods, tasks and models, and (with_defaults)
    the method/task/model its own defaults list selects (what ``kvbench paper=<name>`` alone runs)."""
    missing = []
    if with_defaults:
        for d in (x for x in raw.get("defaults") or [] if isinstance(x, dict)):
            for key, value in d.items():
                group = key.replace("override", "").strip().lstrip("/")
                if group in ("model", "method", "task") and not (CONF_DIR / group / f"{value}.yaml").exists():
                    missing.append(f"conf/{group}/{value}.yaml")
    missing += [f"conf/method/{m['method']}.yaml" for m in grid["methods"]
                if not (CONF_DIR / "method" / f"{m['method']}.yaml").exists()]
    missing += [f"conf/task/{task_name(t)}.yaml" for t in grid["tasks"]
                if not (CONF_DIR / "task" / f"{task_name(t)}.yaml").exists()]
    for m in grid["models"]:
        for o in m.get("overrides") or []:
            if o.startswith("model=") and not (CONF_DIR / "model" / f"{o.split('=', 1)[1]}.yaml").exists():
                missing.append(f"conf/model/{o.split('=', 1)[1]}.yaml")
    return list(dict.fromkeys(missing))


def load_preset(name: str, methods: list[str] | None = None, tasks: list[str] | None = None,
                check_models: bool = True) -> dict:
    """The preset's ``paper`` node (a plain dict), its grid cut to ``methods`` (labels) / ``tasks`` if given,
    and checked: every method, task and model it names must exist in conf/ (and, for the whole preset, what its
    defaults list selects), every grid task entry is a name or ``{name, context_length, overrides}``, and every
    published cell names its source and configuration (``harness.published.check_published``). Raises
    ``KvbenchError`` with one line naming what is missing."""
    from omegaconf import OmegaConf

    from harness.published import check_published

    path = CONF_DIR / "paper" / f"{name}.yaml"
    if not path.exists():
        raise KvbenchError(f"paper={name!r} is not known; allowed: {', '.join(presets())}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    paper = raw.get("paper") if isinstance(raw, dict) else None
    if not isinstance(paper, dict) or paper.get("name") != name:
        raise KvbenchError(f"conf/paper/{name}.yaml has no paper node named {name!r} (paper.name must be the file name)")
    grid = paper.get("grid") or {}
    for key in ("models", "methods", "tasks", "keep_ratio", "context_length"):
        if not grid.get(key):
            raise KvbenchError(f"conf/paper/{name}.yaml: paper.grid.{key} is missing or empty")
    for entry in grid["tasks"]:
        if isinstance(entry, dict) and (set(entry) - {"name", "context_length", "overrides"} or "name" not in entry
                                        or not isinstance(entry.get("context_length", []), list)
                                        or not isinstance(entry.get("overrides", []), list)):
            raise KvbenchError(f"conf/paper/{name}.yaml: paper.grid.tasks entry {entry!r} is not a task name or "
                               "{name: <task>, context_length: [<tokens>, ...], overrides: [<key=value>, ...]}")
    check_published(paper, f"conf/paper/{name}.yaml")
    labels = [m["label"] for m in grid["methods"]]
    if len(set(labels)) != len(labels):
        raise KvbenchError(f"conf/paper/{name}.yaml: method labels repeat in paper.grid.methods: {labels}")
    if methods:
        unknown = [m for m in methods if m not in labels]
        if unknown:
            raise KvbenchError(f"--methods {','.join(unknown)}: not in paper {name}; allowed: {', '.join(labels)}")
        grid["methods"] = [m for m in grid["methods"] if m["label"] in methods]
    if tasks:
        names = [task_name(t) for t in grid["tasks"]]
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise KvbenchError(f"--tasks {','.join(unknown)}: not in paper {name}; allowed: {', '.join(names)}")
        grid["tasks"] = [t for t in grid["tasks"] if task_name(t) in tasks]
    if not check_models:
        grid = {**grid, "models": []}
    missing = _missing(raw, grid, with_defaults=not (methods or tasks or not check_models))
    if missing:
        raise KvbenchError(f"paper={name} needs {', '.join(missing)}, which do(es) not exist (not written yet?); "
                           "add it, or leave it out with --methods/--tasks")
    return paper


def model_label(overrides: list[str], paper: str | None = None) -> str:
    """The model name our rows will carry for these model overrides: ``harness.runner.model_label`` of the model
    config kvbench composes from them (with ``paper=<paper>``), so the config's default model when none is named."""
    from harness.overrides import Composer
    from harness.runner import model_label as run_label

    with Composer(CONF_DIR, "config") as composer:
        cfg = composer.compose(([f"paper={paper}"] if paper else []) + list(overrides))
    return run_label(cfg.model)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _merge(*groups: list[str]) -> list[str]:
    """Overrides in order, a later one replacing an earlier one of the same key."""
    out: dict[str, str] = {}
    for group in groups:
        for o in group:
            out[_key(o)] = o
    return list(out.values())


def plan(name: str, overrides: list[str], methods: list[str] | None = None, models: list[str] | None = None,
         tasks: list[str] | None = None, out_root: str = "results/paper") -> tuple[dict, list[dict]]:
    """The paper node and the jobs: ``[{model, label, overrides, sweep_dir}]`` (overrides without ``-m``)."""
    user_model = [o for o in overrides if _key(o) == "model" or _key(o).startswith("model.")]
    paper = load_preset(name, methods, tasks, check_models=not user_model)
    grid = paper["grid"]
    rest = [o for o in overrides if o not in user_model]
    if user_model:
        model_entries = [{"label": model_label(user_model, name), "overrides": user_model}]
    else:
        model_entries = list(grid["models"])
        if models:
            unknown = sorted(set(models) - {m["label"] for m in model_entries})
            if unknown:
                raise KvbenchError(f"--models {','.join(unknown)}: not in paper {name}; allowed: "
                                   f"{', '.join(m['label'] for m in model_entries)}")
            model_entries = [m for m in model_entries if m["label"] in models]
    # A user's override of a method part's key (method.allocator.profile=...) goes to the jobs whose method
    # has that key (lukv's profile, not snapkv's), since a part's keys are fixed by its class.
    part_keys = [o for o in rest if _key(o).startswith(("method.scorer.", "method.allocator."))]
    # each grid method's keys (its config composed once, and only when the user gave part keys)
    own = {i: _method_keys(m["method"], list(m.get("overrides") or [])) if part_keys else set()
           for i, m in enumerate(grid["methods"])}
    carried = {o for o in part_keys if any(_key(o) in keys for keys in own.values())}
    jobs = []
    for model in model_entries:
        for i, m in enumerate(grid["methods"]):
            mine = [o for o in rest if o not in part_keys or _key(o) in own[i]]
            for task_list, contexts, task_overrides in task_groups(grid):
                base = [f"paper={name}", f"method={m['method']}"] + list(m.get("overrides") or [])
                sweep = [f"task={','.join(task_list)}", f"context_length={','.join(str(c) for c in contexts)}",
                         *task_overrides]
                fixed = [f"keep_ratio={_fmt_list(m['keep_ratio'])}"] if m.get("keep_ratio") else []
                # the method's own keep ratios (full: 1.0) win over the user's; everything else the user sets wins
                job = _merge(base, sweep, list(model.get("overrides") or []), mine, fixed)
                jobs.append({"model": model["label"], "label": m["label"], "overrides": job,
                             "sweep_dir": str(Path(out_root) / name / model["label"])})
    unused = [o for o in part_keys if o not in carried]
    if unused:
        raise KvbenchError(f"{unused[0]}: no method of paper {name} has the key {_key(unused[0])}")
    return paper, jobs


def _method_keys(method: str, overrides: list[str]) -> set[str]:
    """The dotted keys (``method.allocator.profile``, ...) of a method config with a job's overrides."""
    from omegaconf import OmegaConf

    import methods as registry
    from harness.overrides import dotted_keys

    method_overrides = [o.split(".", 1)[1] for o in overrides if _key(o).startswith("method.")]
    return set(dotted_keys(OmegaConf.create(registry.config(method, *method_overrides)), "method."))


def preflight(jobs: list[dict], dry_run: bool = False) -> None:
    """Compose every job's config with Hydra and build its method: unknown methods, allocators, parameters and
    tasks fail here, before any run, with one line. Adds ``method.label=<label>`` where the method's own label
    differs from the grid's, so our rows carry the label the published cells use."""
    from harness.overrides import Composer, expand_jobs
    from harness.runner import check_config

    with Composer(CONF_DIR, "config") as composer:
        for job in jobs:
            labels = set()
            try:  # every combination of the job's comma lists (tasks, ...), checked as kvbench will run it
                for combination in expand_jobs(job["overrides"], multirun=True):
                    labels.add(check_config(composer.compose(combination), model_files=not dry_run)[1].name)
            except KvbenchError as err:
                raise KvbenchError(f"{job['label']} on {job['model']}: {err}") from None
            if labels != {job["label"]}:
                job["overrides"] = _merge(job["overrides"], [f"method.label={job['label']}"])


def command(job: dict) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "-m", *job["overrides"], f"hydra.sweep.dir={job['sweep_dir']}"]


def main(argv: list[str] | None = None) -> None:
    from harness.cli import ArgumentParser, fail

    parser = ArgumentParser(
        prog="kvbench-reproduce",
        description="Run a paper preset's grid (conf/paper/<name>.yaml) and write the report with the published "
                    "numbers beside ours. Extra key=value overrides go to every job; model=... replaces the grid's "
                    "models (e.g. model=reference for a quick offline check).")
    parser.add_argument("paper", help=f"one of: {', '.join(presets())}")
    parser.add_argument("overrides", nargs="*", help="kvbench overrides, e.g. n_samples=5 model=reference")
    parser.add_argument("--methods", help="comma list of grid method labels to run (default: all)")
    parser.add_argument("--models", help="comma list of grid model labels to run (default: all)")
    parser.add_argument("--tasks", help="comma list of grid tasks to run (default: all)")
    parser.add_argument("--out", default="results/paper", help="results root (default: results/paper)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--no-report", action="store_true", help="run the grid only")
    args = parser.parse_intermixed_args(argv)
    split = lambda s: [x for x in s.split(",") if x] if s else None  # noqa: E731
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        fail(f"{bad[0]!r} is not an override (key=value)", prog="kvbench-reproduce")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from harness.cli import check_group_overrides, check_output_dir

    try:
        check_group_overrides(args.overrides)
        paper, jobs = plan(args.paper, args.overrides, split(args.methods), split(args.models), split(args.tasks),
                           args.out)
        preflight(jobs, args.dry_run)  # a dry run checks every job too (not the model files, often elsewhere)
        if not args.dry_run:
            check_output_dir([f"hydra.sweep.dir={args.out}"])
    except KvbenchError as err:
        fail(str(err), prog="kvbench-reproduce")
    failed = []
    for i, job in enumerate(jobs, 1):
        cmd = command(job)
        shown = " ".join(cmd[2:])
        print(f"[{i}/{len(jobs)}] kvbench {' '.join(cmd[4:])}", flush=True)
        if args.dry_run:
            continue
        rc = subprocess.call(cmd, cwd=os.getcwd())
        if rc != 0:
            failed.append((job, rc))
            print(f"kvbench-reproduce: job {job['label']} on {job['model']} failed (exit {rc}): {shown}",
                  file=sys.stderr, flush=True)
    root = Path(args.out) / args.paper
    if not args.dry_run and not args.no_report and root.exists():
        from harness.report import write_report

        try:
            for p in write_report(root):
                print(p)
        except KvbenchError as err:
            fail(str(err))
    if failed:
        fail(f"{len(failed)} of {len(jobs)} jobs failed: "
             + ", ".join(f"{j['label']} on {j['model']}" for j, _ in failed), code=1, prog="kvbench-reproduce")


if __name__ == "__main__":
    main()
