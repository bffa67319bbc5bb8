"""Command-line entry points: ``kvbench`` (a Hydra app) and ``kvbench-report``.

Bad input gets one line on stderr naming the bad value and the allowed ones, and exit status 2, before anything
is written. Before Hydra runs, every job of the command is composed and checked (``harness.overrides``: key
typos, malformed overrides, unknown group choices; ``harness.runner.check_config``: every value's type and
range), so a refused run leaves no dir and no file behind. In a sweep, a job whose values are bad (or that fails
on its data) is reported on its own line and the other jobs still run; the sweep then ends with a summary line
and exit status 2. Ctrl-C and SIGTERM end a run with one line saying how many rows were written: every row is
durable, so rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import signal
import sys
from pathlib import Path

import conf
from conf import CONF_DIR
from harness.errors import KvbenchError
from harness.overrides import PART_GROUPS as METHOD_PARTS
from harness.overrides import PASS_THROUGH, Composer, aliases, expand_jobs, is_multirun, split_argv

GROUPS = ("model", "method", "task", "paper", "paper_model")


def fail(message: str, code: int = 2, prog: str = "kvbench") -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with kvbench's error form: one line ``prog: error: ...`` and exit 2, without the usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: unwinds the run (locks released, temp files removed) and says so."""


@contextlib.contextmanager
def interrupts_reported(prog: str, done: callable = lambda: None):
    """Ctrl-C / SIGTERM inside the block: one line (``done()`` says what was finished) and exit 130 / 143."""
    def on_term(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt as err:
        code = 143 if isinstance(err, Terminated) else 130
        print(f"\n{prog}: interrupted{done()}; rerun the same command to resume", file=sys.stderr)
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)


def group_options(group: str) -> list[str]:
    """The choices of a group: the shipped configs' and the user config dirs' (``conf.options``)."""
    return conf.options(group)


# a method's part groups (method/scorer=<name>, which method.scorer=<name> means: harness.overrides.aliases)
PART_GROUPS = tuple(k.replace(".", "/") for k in METHOD_PARTS)


def check_group_overrides(argv: list[str]) -> None:
    for arg in argv:
        m = re.fullmatch(rf"\+{{0,2}}({'|'.join(PART_GROUPS + GROUPS)})=(.*)", arg)
        # a wrapped scorer's base, as harness.overrides.aliases spells method.scorer.base=<name> for Hydra
        base = re.fullmatch(r"\+{0,2}method/scorer@(method\.scorer(?:\.(?:base|second))+)=(.*)", arg)
        if not m and not base:
            continue
        group, value = ("method/scorer", base.group(2)) if base else m.groups()
        if "(" in value or not value:  # Hydra sweep functions: let Hydra expand them
            continue
        allowed = group_options(group)
        key = base.group(1) if base else group.replace("/", ".") if group in PART_GROUPS else group
        for choice in value.split(","):
            if choice not in allowed:
                typed = choice.strip("'\"") if choice[:1] in "'\"" and choice[-1:] == choice[:1] else choice
                raise KvbenchError(f"{key}={typed!r} is not known; allowed: {_shown(typed, allowed)}")


def _shown(choice: str, allowed: list[str]) -> str:
    """The allowed values worth showing: those under the same prefix (ruler/...), else the top level."""
    prefix = choice.rsplit("/", 1)[0] + "/" if "/" in choice else None
    near = [a for a in allowed if prefix and a.startswith(prefix)]
    if near:
        return ", ".join(near)
    top = sorted({a.split("/", 1)[0] + ("/<name>" if "/" in a else "") for a in allowed})
    return ", ".join(top)


def check_output_dir(argv: list[str]) -> None:
    """The run/sweep dir must be creatable: Hydra makes it before our code runs, with a traceback on failure."""
    chosen = [a.split("=", 1) for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    for key, path in chosen:
        if not path.strip().strip("'\""):
            raise KvbenchError(f"{key}= is empty; pass a directory, e.g. {key}=results/runs/mine")
    for path in [p for _, p in chosen] or ["results"]:
        probe = Path(path).expanduser().absolute()
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK):
            raise KvbenchError(f"output dir {path!r} is not writable ({probe} is not a writable directory); "
                 "pass hydra.run.dir=<writable dir>")


def _override_items(override_dirname: str) -> list[str]:
    """The overrides Hydra joined with "," into ``override_dirname`` (commas inside [], {}, () or quotes kept)."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(override_dirname):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(override_dirname[start:i])
            start = i + 1
    return [*items, override_dirname[start:]] if override_dirname else []


def run_name(override_dirname: str, query_aware=None) -> str:
    """A run directory name from the overrides: stable (resume), readable, filesystem-safe.

    A query-aware run whose mode came from a config, not the command line (task=longbench... defaults to it), gets
    ``query_aware=true`` among its overrides (in Hydra's sorted order), so the name says when the question was
    prefilled and ``task=longbench`` names the same dir as ``task=longbench query_aware=true``. A query-agnostic run
    (the top-level default) is named by its overrides alone, as before."""
    from harness.schema import parse_flag

    items = _override_items(override_dirname)
    if parse_flag(query_aware) is True and not any(re.match(r"[+~]{0,2}query_aware(=|$)", i) for i in items):
        override_dirname = ",".join(sorted([*items, "query_aware=true"]))
    name = override_dirname.replace("/", ".") or "defaults"
    if len(name) > 180:
        name = name[:160] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("kvb_run_name"):
        OmegaConf.register_new_resolver("kvb_run_name", run_name)


# At import, not in main(): submitit jobs unpickle this module in a fresh process and resolve the run dir there.
_register_resolvers()


class Sweep:
    """This process's command: the runs it finished (``{"dir", "overrides", "metrics"}``), the jobs of a sweep
    that failed (their overrides, the error line) and the error of a single run. A job run by another process (a
    cluster launcher) raises instead, so that its launcher reports it."""
    main_pid: int | None = None
    runs: list[dict] = []
    failed: list[tuple[str, str]] = []
    error: KvbenchError | None = None

    @classmethod
    def reset(cls) -> None:
        cls.main_pid, cls.runs, cls.failed, cls.error = os.getpid(), [], [], None


class SweepFailed(KvbenchError):
    """Some jobs of a sweep failed, the others finished: ``result`` holds what ``execute`` returns for them."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def _app(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from harness.runner import run
    from harness.summary import print_metrics

    hydra_cfg = HydraConfig.get()
    out_dir = hydra_cfg.runtime.output_dir
    job = list(hydra_cfg.overrides.task)
    try:
        conf.set_user_dirs(hydra_cfg.searchpath or [])  # a job in its own process: the command's config dirs
        metrics = run(cfg, out_dir)
    except KvbenchError as err:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            Sweep.error = err  # raised by ``execute`` once Hydra has returned
            return
        label = ",".join(job) or "defaults"
        print(f"kvbench: error: job {label}: {err}", file=sys.stderr)
        if os.getpid() != Sweep.main_pid:
            raise
        Sweep.failed.append((label, str(err)))
        return
    Sweep.runs.append({"dir": str(out_dir), "overrides": job, "metrics": metrics})
    print_metrics(metrics, out_dir)


def preflight(overrides: list[str], multirun: bool, config_name: str = "config", check=None) -> None:
    """Compose and check (``check(cfg)``) every job before Hydra makes a dir. A problem of the command itself (a
    key typo, an unknown choice) refuses it; a bad value refuses a run, and a sweep only when every job has it
    (otherwise the bad jobs are reported as they come and the others run)."""
    jobs = expand_jobs(overrides, multirun)
    errors = []
    with Composer(CONF_DIR, config_name) as composer:
        for job in jobs:
            cfg = composer.compose(job)
            try:
                if check is not None:
                    check(cfg)
            except KvbenchError as err:
                errors.append(err)
    if errors and (not multirun or len(errors) == len(jobs)):
        raise errors[0]


_SEARCHPATH = re.compile(r"^\+{0,2}hydra\.searchpath=(.*)$")


def config_dirs(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(argv without them, the user config dirs)``: Hydra's ``--config-dir DIR`` (``-cd DIR``,
    ``--config-dir=DIR``) and ``hydra.searchpath=[file://DIR, pkg://package, ...]``. They are added after the
    shipped configs (``conf.search_path``) for the preflight, the names it checks and Hydra alike."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    rest, dirs = [], []
    args = iter(argv)
    for arg in args:
        if arg in ("-cd", "--config-dir"):
            value = next(args, "")
            if not value:
                raise KvbenchError(f"{arg} needs a directory")
            dirs.append(value)
        elif arg.startswith(("--config-dir=", "-cd=")):
            dirs.append(arg.split("=", 1)[1])
        elif _SEARCHPATH.match(arg):
            try:
                value = OverridesParser.create().parse_overrides([arg])[0].value()
            except HydraException:
                value = None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise KvbenchError(f"{arg}: hydra.searchpath must be a list of dirs, e.g. "
                                   "hydra.searchpath=[file://my_conf]")
            dirs.extend(value)
        else:
            rest.append(arg)
    return rest, dirs


def run_hydra(config_name: str, app, check, argv: list[str]) -> None:
    """One Hydra command (kvbench, kvbench-train) on ``argv`` (aliases already expanded): the user's config dirs
    added, every job composed and checked first (``KvbenchError``), then Hydra runs ``app``. ``sys.argv`` comes
    back as it was (the library calls this too)."""
    argv, dirs = config_dirs(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with conf.using(dirs):
        overrides, flags = split_argv(argv)
        if not PASS_THROUGH & set(flags):
            check_group_overrides(overrides)
            check_output_dir(overrides)
            preflight(overrides, is_multirun(argv), config_name, check)
        import hydra

        saved = sys.argv
        sys.argv = [sys.argv[0] if sys.argv else "kvbench", *argv, *conf.searchpath_override()]  # hydra reads it
        try:
            with _logging_kept():
                hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=config_name)(app)()
        finally:
            sys.argv = saved


@contextlib.contextmanager
def _logging_kept():
    """Hydra configures the root and ``hydra`` loggers for its jobs; afterwards they are as they were (a script
    calling ``kvbench.run`` keeps its own logging)."""
    loggers = [logging.getLogger(), logging.getLogger("hydra")]
    before = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:
        yield
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, before):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def hydra_command(prog: str, config_name: str, app, check, argv: list[str] | None, done=lambda: "") -> None:
    """The entry of a Hydra command (kvbench-train): ``run_hydra``, with interrupts and bad input ending it with
    one line."""
    argv = aliases(sys.argv[1:] if argv is None else list(argv))  # method.allocator=adakv -> method/allocator=adakv
    with interrupts_reported(prog, done):
        try:
            run_hydra(config_name, app, check, argv)
        except KvbenchError as err:
            fail(str(err), prog=prog)


def execute(argv: list[str]) -> dict:
    """What ``kvbench ARGS`` does, as a function (``kvbench.run`` and the command both call it): every job
    checked, then run by Hydra into its run dir. Returns ``{"runs": [{"dir", "overrides", "metrics"}, ...],
    "failed": []}`` (the runs this process made, in order); bad input raises ``KvbenchError`` with the line the
    command prints, before any dir is touched; a sweep some of whose jobs failed raises ``SweepFailed`` after the
    others finished (its ``result`` lists both)."""
    from harness.runner import check_config

    Sweep.reset()
    run_hydra("config", _app, check_config, aliases(list(argv)))  # method.allocator=adakv -> method/allocator=adakv
    if Sweep.error is not None:
        raise Sweep.error
    result = {"runs": list(Sweep.runs), "failed": [{"job": job, "error": err} for job, err in Sweep.failed]}
    if Sweep.failed:
        jobs = "; ".join(job for job, _ in Sweep.failed)
        raise SweepFailed(f"{len(Sweep.failed)} job(s) of the sweep failed (the others finished): {jobs}", result)
    return result


def version() -> str:
    from kvbench import __version__

    return __version__


def main(argv: list[str] | None = None) -> None:
    """``kvbench``: ``execute`` with one line and exit status 2 for bad input, and one line for an interrupt."""
    from harness.runner import RowCounter

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--version" in split_argv(argv)[1]:
        print(f"kvbench {version()}")
        return
    with interrupts_reported("kvbench", lambda: f" after {RowCounter.written} new rows"):
        try:
            execute(argv)
        except KvbenchError as err:
            fail(str(err))


def report_main() -> None:
    parser = ArgumentParser(prog="kvbench-report", description="Tables and plots from run dirs below DIR.")
    parser.add_argument("dir", help="a results directory (walked recursively for predictions.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the report (default: DIR)")
    args = parser.parse_args()
    from harness.report import write_report

    with interrupts_reported("kvbench-report", lambda: " (every file it wrote is whole)"):
        try:
            paths = write_report(args.dir, args.out)
        except KvbenchError as err:
            fail(str(err), prog="kvbench-report")
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
