"""Command-line entry points: ``kvbench`` (a Hydra app) and ``kvbench-report``.

Bad input gets one line on stderr naming the bad value and the allowed ones, and exit status 2. Config-group
choices (``model=``, ``method=``, ``task=``, ``paper=``) are checked before Hydra composes, because Hydra's own
message for them is a multi-line traceback.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "task", "paper")


def fail(message: str, code: int = 2) -> None:
    print(f"kvbench: error: {message}", file=sys.stderr)
    sys.exit(code)


def group_options(group: str) -> list[str]:
    root = CONF_DIR / group
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.yaml")
        if not p.name.startswith("_")
    )


def check_group_overrides(argv: list[str]) -> None:
    for arg in argv:
        m = re.fullmatch(r"\+{0,2}(model|method|task|paper)=(.*)", arg)
        if not m:
            continue
        group, value = m.groups()
        if "(" in value or not value:  # Hydra sweep functions: let Hydra expand them
            continue
        allowed = group_options(group)
        for choice in value.split(","):
            if choice not in allowed:
                fail(f"{group}={choice!r} is not known; allowed: {_shown(choice, allowed)}")


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
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    for path in chosen or ["results"]:
        probe = Path(path).expanduser().absolute()
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK):
            fail(f"output dir {path!r} is not writable ({probe} is not a writable directory); "
                 "pass hydra.run.dir=<writable dir>")


def run_name(override_dirname: str) -> str:
    """A run directory name from the overrides: stable (resume), readable, filesystem-safe."""
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


def _app(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from harness.errors import KvbenchError
    from harness.runner import run
    from harness.summary import print_metrics

    try:
        out_dir = HydraConfig.get().runtime.output_dir
        metrics = run(cfg, out_dir)
    except KvbenchError as err:
        fail(str(err))
    print_metrics(metrics, out_dir)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    check_group_overrides(sys.argv[1:])
    check_output_dir(sys.argv[1:])
    import hydra

    hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")(_app)()


def report_main() -> None:
    import argparse

    from harness.errors import KvbenchError

    parser = argparse.ArgumentParser(prog="kvbench-report", description="Tables and plots from run dirs below DIR.")
    parser.add_argument("dir", help="a results directory (walked recursively for predictions.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the report (default: DIR)")
    args = parser.parse_args()
    from harness.report import write_report

    try:
        paths = write_report(args.dir, args.out)
    except KvbenchError as err:
        fail(str(err))
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
