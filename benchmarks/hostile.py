"""A bad-input campaign against every kvbench command: counts of how each case ended.

    python benchmarks/hostile.py [--jobs 2] [--timeout 60] [--verbose] [--json PATH] [--only REGEX] [--list]

The cases are generated, not listed by hand: the overrides come from the config tree itself (Hydra's compose API
on conf/: the top-level keys of ``config``, the keys of every ``model``, ``method`` and ``task`` option, the keys
of ``train``), each with bad values chosen by the type of the values the key takes anywhere in the tree (and in
the paper presets), plus a typo of every key, an unknown choice of every config group, and the good spellings of
booleans (``yes``, ``no``, ``0``, ``1``, ``'False '``), which must be accepted and recorded as booleans. Input
files (a model dir, LKV/SP-KV checkpoint dirs, the LU-KV profile, LongBench and RULER data, a finished run dir,
kvbench-train's and kvbench-train-reference's resume state) are copied and corrupted generically: emptied, cut
to half, random bytes, a non-UTF-8 byte, valid data of the wrong type, removed. Flags of the argparse commands
come from their ``add_argument`` calls (read with ``ast``, nothing imported).

Every case runs in a fresh temporary working dir with a small fast config. Outcomes:

* ``clean``: a bad case refused with exit status 2 and exactly one line ``<command>: error: ...`` (other
  lines only if none looks like a traceback), in time;
* ``ok``: a good case (a good spelling, an intact control) exit 0, the boolean recorded right where checkable;
  or a case where recovering is as right as refusing (a torn last row of predictions.jsonl) exit 0;
* ``traceback``: "Traceback (most recent call last)", or Hydra's multi-line error text (exit 1);
* ``silent``: a bad case exit 0;
* ``silent-wrong``: a good spelling run, but the recorded value is not the right boolean;
* ``refused``: a good case refused;
* ``unclean``: refused without a traceback but not as above (another exit status, no or several error lines,
  the error line of another command's name);
* ``hang``: not finished within ``--timeout`` (the process group is killed);
* ``data lost``: a file that existed before the case (a run dir, a checkpoint, a work dir) differs afterwards
  (sha256), or is gone; an append-only file (``*.jsonl`` the command writes) may grow or lose its torn last line;
* ``unpickled``: an input file that must never be unpickled was (its payload left a marker file);
* ``setup failed``: the good run the case corrupts a copy of could not be made.

The exit status is 0 unless the script itself breaks; with ``--strict``, 1 when any case is not clean or ok.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
BIN = Path(sys.executable).parent
REFERENCE = REPO / "harness" / "reference"

OUTCOMES = ("clean", "ok", "traceback", "silent", "silent-wrong", "refused", "unclean", "hang", "data lost",
            "unpickled", "setup failed")
GOOD = ("clean", "ok")

# The small fast config every kvbench case starts from (context_length 512: the byte-level tokenizer of
# tiny-random makes RULER's smallest prompt longer than 256 tokens). A case's own overrides replace these by key.
FAST = ["model=tiny-random", "task=ruler/niah_single_1", "n_samples=1", "context_length=512", "max_new_tokens=2",
        "progress=false", "hydra.run.dir={tmp}/run"]
REFERENCE_MODEL = ["model=reference", "context_length=512"]  # for inputs bound to the shipped reference model
TRAIN_FAST = ["model=tiny-random", "method=lkv", "steps=1", "save_every=1", "data.context_length=512",
              "data.max_new_tokens=2", "progress=false", "out={tmp}/out"]
PROFILE_FAST = ["model=tiny-random", "task=ruler/niah_single_1", "n_samples=1", "context_length=512",
                "out={tmp}/profile.safetensors"]
TRAIN_REFERENCE_FAST = ["--tiny", "--steps", "1", "--focus-steps", "0", "--drill-steps", "0", "--eval-every",
                        "1000000", "--out", "{tmp}/out", "--work-dir", "{tmp}/work"]

# Booleans: spellings that must be accepted (value, the boolean it means), and values that must be refused.
GOOD_BOOLS = (("yes", True), ("no", False), ("1", True), ("0", False), ("False ", False))
BAD_BOOLS = ("maybe", "2", "''")
FREE_TEXT = re.compile(r"^label$")              # a display name: any text is a good value
RATIO = re.compile(r"ratio|share|alpha|frac")   # a fraction: 2.0 is out of range
PATH_IN = re.compile(r"(path|dir|checkpoint|profile|init)$")
PATH_OUT = re.compile(r"^(out|work)")
TRACE_LINE = re.compile(r'^(Traceback \(most recent call last\)|\s+File ".*", line \d+|'
                        r'[A-Za-z_][\w.]*(Error|Exception)(:|$))')


@dataclass
class Case:
    id: str
    command: str                  # an entry point of pyproject.toml
    args: list[str]               # "{tmp}" is the case's working dir
    expect: str = "error"         # error | ok | either (exit 0 and a clean refusal are both right)
    shown: str = ""               # the override or file under test
    prepare: Callable[[Path], None] | None = None
    watch: str | None = None      # a dir under {tmp} whose files must survive the case
    appendable: tuple[str, ...] = ()   # file names under watch the command may append to
    want: tuple[str, bool] | None = None  # key of {tmp}/run/config.yaml and the boolean it must hold
    marker: str | None = None     # a file under {tmp} that exists only if an input was unpickled
    needs: str | None = None      # a setup artifact (see SETUPS) the prepare step copies


# ------------------------------------------------------------------------------------------------ helpers
def key_of(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def merge(base: list[str], extra: list[str]) -> list[str]:
    """``base`` without the keys ``extra`` sets, then ``extra``."""
    keys = {key_of(a) for a in extra if "=" in a}
    return [a for a in base if key_of(a) not in keys] + extra


def merge_flags(base: list[str], extra: list[str]) -> list[str]:
    """argparse flags: ``base`` (``--flag value`` pairs and switches) without the flags ``extra`` sets."""
    names = {a.split("=", 1)[0] for a in extra if a.startswith("--")}
    out, i = [], 0
    while i < len(base):
        takes_value = i + 1 < len(base) and not base[i + 1].startswith("--")
        if base[i] not in names:
            out += base[i:i + 1 + takes_value]
        i += 1 + takes_value
    return out + extra


def hydra_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    return text if re.fullmatch(r"[\w./-]+", text) else "'" + text.replace("'", "\\'") + "'"


def typo(name: str, i: int) -> str:
    """One letter dropped (even ``i``) or two neighbours swapped (odd ``i``), never the name itself."""
    mid = max(1, len(name) // 2)
    if i % 2 == 0 and len(name) > 1:
        return name[:mid] + name[mid + 1:]
    for j in range(mid - 1, len(name) - 1):
        if name[j] != name[j + 1]:
            return name[:j] + name[j + 1] + name[j] + name[j + 2:]
    return name + name[-1]


def slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)[:60]


def group_options(group: str) -> list[str]:
    """The choices of a group, as kvbench lists them (method/scorer, method/allocator are parts, not methods)."""
    from harness.cli import group_options as options

    return options(group)


def flat(cfg: dict, prefix: str = "") -> dict:
    """A nested config node as dotted keys (``scorer.window``); interpolations (a value that follows another
    key) are left out: the key they follow is tried instead."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif not (isinstance(v, str) and v.startswith("${")):
            out[f"{prefix}{k}"] = v
    return out


def group_dirs() -> list[str]:
    """Every config group, nested ones too (task/ruler): dirs of conf/ holding yaml files."""
    return sorted(str(d.relative_to(CONF)) for d in CONF.rglob("*") if d.is_dir() and any(d.glob("*.yaml")))


# ------------------------------------------------------------------------------------------- the config tree
@dataclass
class Key:
    path: str                     # keep_ratio, method.scorer.window, data.tasks
    values: list                  # every value it takes in the tree
    host: list[str] = field(default_factory=list)  # overrides that select a config where it exists
    command: str = "kvbench"
    current: object = None        # its value there

    def __post_init__(self):
        self.current = self.current if self.current is not None else self.values[0]


def compose_tree() -> tuple[list[Key], list[Key]]:
    """The keys of ``config`` (top level and per group option) and of ``train``, from Hydra's compose API."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    def plain(cfg) -> dict:
        return OmegaConf.to_container(cfg, resolve=False)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        base = plain(compose("config"))
        tops = {k: Key(k, [v]) for k, v in base.items() if not isinstance(v, dict)}
        for paper in group_options("paper"):  # a preset's values are values the key takes (keep_ratio lists)
            for k, v in plain(compose("config", overrides=[f"paper={paper}"])).items():
                if k in tops:
                    tops[k].values.append(v)
        keys = list(tops.values())
        for group in ("model", "method", "task"):
            options = {o: flat(plain(compose("config", overrides=[f"{group}={o}"]))[group])
                       for o in group_options(group)}
            keys += group_keys(group, options, base[group]["name"])
        train = plain(compose("train"))
    GlobalHydra.instance().clear()
    return keys, train_keys(train)


def has_inputs(cfg: dict) -> bool:
    """A group option that reads a file bound to the reference model (a checkpoint, a profile)."""
    return any(PATH_IN.search(k) and v is not None for k, v in cfg.items())


def group_keys(group: str, options: dict[str, dict], default: str) -> list[Key]:
    """One Key per key of the group, hosted by the cheapest option where it has a value: the default option,
    then options reading no input files, options whose own yaml sets it, then by name."""
    own = {o: (CONF / group / f"{o}.yaml").read_text() for o in options}
    names = list(dict.fromkeys(k for cfg in options.values() for k in cfg))
    keys = []
    for name in names:
        holders = [o for o, cfg in options.items() if name in cfg]
        valued = [o for o in holders if options[o][name] is not None] or holders
        leaf = name.rsplit(".", 1)[-1]
        host = min(valued, key=lambda o: (o != default, has_inputs(options[o]),
                                          not re.search(rf"^\s*{leaf}:", own[o], re.M), o))
        overrides = [f"{group}={host}"] + (REFERENCE_MODEL if has_inputs(options[host]) else [])
        keys.append(Key(f"{group}.{name}", [options[o][name] for o in holders], overrides,
                        current=options[host][name]))
    return keys


def train_keys(train: dict) -> list[Key]:
    """kvbench-train's own keys (its model and method groups are kvbench's); a section named after a method
    (lkv.*, spkv.*) is tried with that method."""
    keys = []
    for section, value in train.items():
        if section in ("model", "method", "hydra"):
            continue
        if not isinstance(value, dict):
            keys.append(Key(section, [value], command="kvbench-train"))
            continue
        host = [f"method={section}"] if (CONF / "method" / f"{section}.yaml").exists() else []
        keys += [Key(f"{section}.{k}", [v], host, "kvbench-train") for k, v in value.items()]
    return keys


# ------------------------------------------------------------------------------------- values per type
def bad_values(key: Key) -> list[tuple[str, str, bool | None]]:
    """(value as typed on the command line, expect, the boolean a good spelling means) for one key."""
    seen = [v for v in key.values if v is not None]
    kinds = {type(v) for v in seen}
    name = key.path.rsplit(".", 1)[-1]
    out: list[tuple[str, str, bool | None]] = []
    if bool in kinds:
        out += [(v, "error", None) for v in BAD_BOOLS]
    if int in kinds and float not in kinds:
        out += [(v, "error", None) for v in ("abc", "1.5", "true", "''")]
        out += [("-1", "error", None)] if all(v >= 0 for v in seen) else []
        out += [("0", "error", None)] if 0 not in seen else []
    if float in kinds:
        out += [(v, "error", None) for v in ("abc", "true", "nan", "inf")]
        out += [("-0.5", "error", None)] if all(v >= 0 for v in seen if not isinstance(v, list)) else []
        out += [("2.0", "error", None)] if RATIO.search(name) else []
    if str in kinds and not (PATH_IN.search(name) or PATH_OUT.search(name)):
        out += [("hostile-label", "ok", None)] if FREE_TEXT.search(name) else [("''", "error", None),
                                                                                ("nope", "error", None)]
    if list in kinds:
        out += [("[]", "error", None)] if [] not in seen else []
        out += [("[abc]", "error", None)]
        first = next((v[0] for v in seen if isinstance(v, list) and v), None)
        # a repeated value is one value (keep_ratio=[0.5,0.5] is one budget: rows are keyed, stored once)
        out += [(hydra_value([first, first]), "ok", None)] if first is not None else []
    if kinds <= {str} and PATH_OUT.search(name):  # a path to write: empty, or below a regular file
        out += [("''", "error", None), ("{tmp}/afile/sub", "error", None)]
    elif kinds <= {str} and PATH_IN.search(name):  # a path to read: empty, or not there
        out += [("''", "error", None), ("{tmp}/nonexistent", "error", None)]
    elif not kinds:  # null everywhere: a value of unknown type
        out += [("abc", "error", None), ("[]", "error", None)]
    return list({v: (v, e, b) for v, e, b in out}.values())


def good_bools(index: int) -> list[tuple[str, str, bool]]:
    """Two good spellings per boolean key, rotating so that the keys together try every spelling."""
    picks = [GOOD_BOOLS[(2 * index + j) % len(GOOD_BOOLS)] for j in range(2)]
    return [(v, "ok", b) for v, b in picks]


# ------------------------------------------------------------------------------------------ file corruption
def tiny_safetensors() -> bytes:
    """A valid safetensors file of one unrelated tensor: the right format, the wrong content."""
    header = json.dumps({"unrelated": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + bytes(8)


def wrong_type(path: Path, data: bytes) -> bytes:
    """Valid data of the file's format, of the wrong type (a list where an object belongs)."""
    suffix = path.suffix
    if suffix == ".safetensors":
        return tiny_safetensors()
    if suffix == ".jsonl":
        return b"".join(json.dumps([json.loads(x)]).encode() + b"\n" for x in data.splitlines() if x.strip())
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump([yaml.safe_load(data)]).encode()
    try:
        return json.dumps([json.loads(data)]).encode()
    except ValueError:
        return b"[]"


def non_utf8(data: bytes) -> bytes:
    """A byte that is never UTF-8, inside a string near the middle (at the middle of a binary file)."""
    mid = len(data) // 2
    quote = data.find(b'"', mid)
    at = quote + 1 if quote >= 0 else mid
    return data[:at] + b"\xff" + data[at:]


CORRUPTIONS: dict[str, Callable[[Path, bytes], bytes]] = {
    "empty": lambda p, d: b"",
    "half": lambda p, d: d[: len(d) // 2],
    # ends in a newline: a whole line of garbage, not a torn last line a reader may drop
    "random": lambda p, d: random.Random(str(p.name)).randbytes(max(64, len(d)) - 1) + b"\n",
    "non-utf8": lambda p, d: non_utf8(d),
    "wrong-type": wrong_type,
}


def damage(path: Path, kind: str) -> None:
    """Corrupt ``path`` in place (``missing``: remove it)."""
    if kind == "missing":
        path.unlink()
        return
    path.write_bytes(CORRUPTIONS[kind](path, path.read_bytes()))


def copy_into(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def copy_and_damage(src: Path | Callable[[], Path], dest: str, target: str | None, kind: str | None):
    """A prepare step: ``src`` (a path, or a function giving one once setup made it) copied to ``{tmp}/dest``,
    then ``target`` (a path inside the copy, or the copy itself when None) damaged with ``kind``."""
    def prepare(tmp: Path) -> None:
        where = tmp / dest
        copy_into(src() if callable(src) else src, where)
        if kind:
            damage(where / target if target else where, kind)
    return prepare


def write_file(dest: str, data: bytes, kind: str | None = None):
    def prepare(tmp: Path) -> None:
        path = tmp / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if kind:
            damage(path, kind)
    return prepare


class Payload:
    """Unpickled, it opens ``path`` for writing: the marker that an input file was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


# -------------------------------------------------------------------------------------------- setup artifacts
# Good runs made once; cases corrupt copies of them. name -> (command, args, the dir the cases copy).
SETUPS = {
    "rundir": ("kvbench", FAST, "run"),
    "trainout": ("kvbench-train", TRAIN_FAST, "out"),
    "refwork": ("kvbench-train-reference", TRAIN_REFERENCE_FAST, "work"),
}
ARTIFACTS: dict[str, Path] = {}
SETUP_ERRORS: dict[str, str] = {}


def artifact(name: str) -> Callable[[], Path]:
    return lambda: ARTIFACTS[name]


def make_setups(root: Path, names: set[str], timeout: float, jobs: int) -> None:
    def one(name: str) -> None:
        command, args, keep = SETUPS[name]
        tmp = root / f"_setup-{name}"
        tmp.mkdir()
        rc, text, _, hung = execute([str(BIN / command), *[a.replace("{tmp}", str(tmp)) for a in args]], tmp,
                                    timeout * 2)
        if rc == 0 and (tmp / keep).is_dir():
            ARTIFACTS[name] = tmp / keep
        else:
            lines = [x for x in text.splitlines() if x.strip()] or ["(no output)"]
            SETUP_ERRORS[name] = f"{command} exit {rc}{' (hang)' if hung else ''}: {lines[-1]}"

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, sorted(names)))


# ---------------------------------------------------------------------------------------------- case families
def override_cases(keys: list[Key], most: int | None = None) -> Iterator[Case]:
    """Every key of the tree with the bad values of its type (the first ``most``), and the good spellings of
    booleans."""
    bool_index = 0
    for key in keys:
        values = bad_values(key)[:most]
        if any(isinstance(v, bool) for v in key.values):
            values += good_bools(bool_index)
            bool_index += 1
        for value, expect, means in values:
            override = f"{key.path}={value}"
            base = FAST if key.command == "kvbench" else TRAIN_FAST
            want = (key.path, means) if means is not None and key.command == "kvbench" else None
            yield Case(f"{key.command}/{override}", key.command, merge(base, key.host + [override]), expect,
                       override, want=want)


def typo_cases(keys: list[Key]) -> Iterator[Case]:
    """Every key misspelt, with a value it takes."""
    for i, key in enumerate(keys):
        *parents, name = key.path.split(".")
        wrong = ".".join(parents + [typo(name, i)])
        override = f"{wrong}={hydra_value(key.current)}"
        base = FAST if key.command == "kvbench" else TRAIN_FAST
        yield Case(f"{key.command}/typo/{override}", key.command, merge(base, key.host + [override]), "error", override)


def group_cases() -> Iterator[Case]:
    """An unknown choice of every config group (nested ones too), an empty choice of each top group, and
    arguments Hydra cannot parse as overrides."""
    for group in group_dirs():
        top, _, sub = group.partition("/")
        override = f"{top}={sub + '/' if sub else ''}nope"
        yield Case(f"kvbench/group/{override}", "kvbench", merge(FAST, [override]), "error", override)
        if not sub and top in ("model", "method", "task"):
            yield Case(f"kvbench/group/{top}=", "kvbench", merge(FAST, [f"{top}="]), "error", f"{top}=")
    for arg in ("notanoverride", "--nope"):
        yield Case(f"kvbench/arg/{arg}", "kvbench", FAST + [arg], "error", arg)


def run_dir_override_cases() -> Iterator[Case]:
    """hydra.run.dir empty, a file, below a file."""
    for value in ("", "{tmp}/afile", "{tmp}/afile/sub"):
        override = f"hydra.run.dir={value}"
        yield Case(f"kvbench/{override}", "kvbench", merge(FAST, [override]), "error", override)


def dir_family(family: str, src: Path, dest: str, files: list[str], args: list[str]) -> Iterator[Case]:
    """An input dir copied to ``{tmp}/dest``: intact (must run), each file corrupted every way or removed."""
    yield Case(f"{family}/intact", "kvbench", args, "ok", f"{dest}/ intact", copy_and_damage(src, dest, None, None))
    for name in files:
        kinds = list(CORRUPTIONS) + ["missing"]
        for kind in kinds:
            yield Case(f"{family}/{name}/{kind}", "kvbench", args, "error", f"{dest}/{name} {kind}",
                       copy_and_damage(src, dest, name, kind))


def file_family(family: str, data: bytes, dest: str, args: list[str],
                extra: dict[str, bytes] | None = None) -> Iterator[Case]:
    """An input file written to ``{tmp}/dest``: intact (must run), corrupted every way, removed, and ``extra``
    contents (well-formed but unusable) that must be refused."""
    yield Case(f"{family}/intact", "kvbench", args, "ok", f"{dest} intact", write_file(dest, data))
    for kind in list(CORRUPTIONS) + ["missing"]:
        yield Case(f"{family}/{kind}", "kvbench", args, "error", f"{dest} {kind}", write_file(dest, data, kind))
    for label, content in (extra or {}).items():
        yield Case(f"{family}/{label}", "kvbench", args, "error", f"{dest} = {label}", write_file(dest, content))


def input_file_cases() -> Iterator[Case]:
    ref = merge(FAST, REFERENCE_MODEL)
    yield from dir_family("file/model", REFERENCE / "checkpoint", "model",
                          ["config.json", "model.safetensors", "tokenizer.json"], ref + ["model.path={tmp}/model"])
    for method in ("lkv", "spkv"):
        yield from dir_family(f"file/{method}", REFERENCE / method, method, ["config.json", "params.safetensors"],
                              ref + [f"method={method}", f"method.scorer.checkpoint={{tmp}}/{method}"])
    yield from file_family("file/lukv-profile", (REFERENCE / "lukv_profile.safetensors").read_bytes(),
                           "profile.safetensors", ref + ["method=lukv", "method.allocator.profile={tmp}/profile.safetensors"])
    yield from file_family("file/longbench", (REPO / "tests/fixtures/longbench/qasper.jsonl").read_bytes(),
                           "data/qasper.jsonl", merge(FAST, ["task=longbench/qasper", "task.data_dir={tmp}/data"]))
    essays = json.dumps({"text": (REPO / "tasks/ruler/data/fallback_essays.txt").read_text()}).encode()
    yield from file_family("file/ruler-essays", essays, "data/PaulGrahamEssays.json",
                           merge(FAST, ["task=ruler/niah_single_2", "task.data_dir={tmp}/data"]),
                           {"empty-text": b'{"text": ""}', "no-text": b"{}"})


def resume_expect(name: str, kind: str, reader: bool) -> str:
    """Refusing is right for a damaged input; a removed file, or an append-only file emptied or with a torn
    last line, may also be recovered from; a reader (kvbench-report) need not read config.yaml."""
    if kind == "missing" or (name.endswith(".jsonl") and kind in ("empty", "half")):
        return "either"
    return "either" if reader and not name.endswith(".jsonl") else "error"


def resume_family(family: str, setup: str, dest: str, files: list[str], runs: dict[str, list[str]],
                  kinds: list[str] | None = None) -> Iterator[Case]:
    """A finished good run (setup artifact) copied to ``{tmp}/dest``, a file of it damaged, and the same command
    rerun (resume) / read: refused or recovered, never losing what was there."""
    kinds = kinds or list(CORRUPTIONS) + ["missing"]
    for command, args in runs.items():
        writes = tuple(f for f in files if f.endswith(".jsonl")) if command == SETUPS[setup][0] else ()
        yield Case(f"{family}/intact/{command}", command, args, "ok", f"{dest}/ intact",
                   copy_and_damage(artifact(setup), dest, None, None), watch=dest, appendable=writes, needs=setup)
        for name in files:
            for kind in kinds:
                expect = resume_expect(name, kind, reader=command != SETUPS[setup][0])
                yield Case(f"{family}/{name}/{kind}/{command}", command, args, expect, f"{dest}/{name} {kind}",
                           copy_and_damage(artifact(setup), dest, name, kind), watch=dest, appendable=writes,
                           needs=setup)


def resume_cases() -> Iterator[Case]:
    yield from resume_family("rundir", "rundir", "run", ["predictions.jsonl", "config.yaml"],
                             {"kvbench": FAST, "kvbench-report": ["{tmp}/run"]})
    yield Case("rundir/changed-config/kvbench", "kvbench", merge(FAST, ["keep_ratio=0.25"]), "error",
               "run/ rerun with keep_ratio=0.25", copy_and_damage(artifact("rundir"), "run", None, None),
               watch="run", needs="rundir")
    yield from resume_family("train-resume", "trainout", "out",
                             ["config.json", "params.safetensors", "history.jsonl", "train_state.safetensors"],
                             {"kvbench-train": TRAIN_FAST})
    yield Case("train-resume/other-method", "kvbench-train", merge(TRAIN_FAST, ["method=spkv"]), "error",
               "out/ of lkv, method=spkv", copy_and_damage(artifact("trainout"), "out", None, None),
               watch="out", needs="trainout")
    yield from resume_family("train-reference-resume", "refwork", "work",
                             ["state.safetensors", "tokenizer/tokenizer.json"],
                             {"kvbench-train-reference": TRAIN_REFERENCE_FAST})


def pickle_cases() -> Iterator[Case]:
    """kvbench-train-reference's legacy work-dir state (a pickle) must be refused, never unpickled."""
    args = TRAIN_REFERENCE_FAST
    payload = pickle.dumps(Payload("PWNED"))  # relative: the case's working dir
    for label, data in (("state.pt-random", random.Random(0).randbytes(4096)), ("state.pt-payload", payload),
                        ("state.pt-empty", b"")):
        yield Case(f"train-reference/{label}", "kvbench-train-reference", args, "error", f"work/{label}",
                   write_file("work/state.pt", data), watch="work", marker="PWNED")


def argparse_flags(path: Path) -> list[tuple[str, str]]:
    """(--flag, kind) of every ``add_argument("--flag", ...)`` in a file: int, float, str or switch."""
    flags = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        action = kw.get("action")
        if isinstance(action, ast.Constant) and str(action.value).startswith("store_"):
            kind = "switch"
        else:
            kind = getattr(kw.get("type"), "id", "str")
        flags.append((node.args[0].value, kind))
    return flags


def flag_values(flag: str, kind: str) -> list[str]:
    name = flag.lstrip("-").replace("-", "_")
    if kind == "switch":
        return [f"{flag}=1"]
    if kind == "int":
        return [f"{flag}=abc", f"{flag}=-1"]
    if kind == "float":
        return [f"{flag}=abc", f"{flag}=nan"]
    if PATH_OUT.search(name) or PATH_IN.search(name):
        return [f"{flag}={{tmp}}/afile/sub"]
    return [f"{flag}=nope"]


def flag_cases(command: str, source: Path, base: list[str], skip: tuple[str, ...] = ()) -> Iterator[Case]:
    """Bad values of every flag of an argparse command, and an unknown flag."""
    for flag, kind in argparse_flags(source):
        if flag in skip:
            continue
        for arg in flag_values(flag, kind):
            yield Case(f"{command}/{arg}", command, merge_flags(base, [arg]), "error", arg)
    yield Case(f"{command}/--nope", command, base + ["--nope"], "error", "--nope")


def report_cases() -> Iterator[Case]:
    for label, target in (("nonexistent", "{tmp}/nope"), ("a-file", "{tmp}/afile"), ("empty-dir", "{tmp}/empty")):
        yield Case(f"kvbench-report/{label}", "kvbench-report", [target], "error", f"DIR = {label}")
    yield Case("kvbench-report/no-args", "kvbench-report", [], "error", "(no arguments)")
    for label, out in (("below-a-file", "{tmp}/afile/sub"), ("a-file", "{tmp}/afile")):
        yield Case(f"kvbench-report/--out-{label}", "kvbench-report", ["{tmp}/run", "--out", out], "error",
                   f"--out {label}", copy_and_damage(artifact("rundir"), "run", None, None), watch="run",
                   needs="rundir")
    yield Case("kvbench-report/--nope", "kvbench-report", ["{tmp}/empty", "--nope"], "error", "--nope")


def profile_own_keys(kvbench_keys: set[str]) -> list[Key]:
    """kvbench-profile's own keys (its OWN_KEYS; the keys of its usage line that are not kvbench's if it does
    not import), with the defaults the usage line or its option model give."""
    import yaml

    text = (REPO / "harness" / "profile.py").read_text()
    documented = dict(re.findall(r"\[?\b(\w+)=([^\]\s]+)", text.split('"""')[1]))
    try:
        from harness import profile

        names = sorted(profile.OWN_KEYS)
        fields = getattr(getattr(profile, "ProfileOptions", None), "model_fields", {})
    except Exception:  # the module is being edited: its documented keys that are not kvbench's
        names = [k for k in documented if k not in kvbench_keys]
        fields = {}

    def default(name: str):
        if name in documented:
            return yaml.safe_load(documented[name])
        value = getattr(fields.get(name), "default", None)
        return value if isinstance(value, (int, float, str)) else None

    return [Key(n, [default(n)], command="kvbench-profile") for n in names]


def profile_cases(keys: list[Key]) -> Iterator[Case]:
    """kvbench-profile: its own keys' bad values and typos, kvbench keys, tasks that cannot be built."""
    for i, key in enumerate(profile_own_keys({k.path for k in keys} | {"model", "method", "task"})):
        for value, _, _ in bad_values(key)[:3]:
            override = f"{key.path}={value}"
            yield Case(f"kvbench-profile/{override}", "kvbench-profile", merge(PROFILE_FAST, [override]), "error",
                       override)
        override = f"{typo(key.path, i)}={hydra_value(key.current)}"
        yield Case(f"kvbench-profile/typo/{override}", "kvbench-profile", PROFILE_FAST + [override], "error", override)
    for i, key in enumerate(keys[:4]):  # the first kvbench keys, one bad value each
        values = bad_values(key)
        override = f"{key.path}={values[i % len(values)][0]}"
        yield Case(f"kvbench-profile/{override}", "kvbench-profile", merge(PROFILE_FAST, [override]), "error", override)
    shared = [("no-out", [a for a in PROFILE_FAST if not a.startswith("out=")], "error"),
              ("method=nope", PROFILE_FAST + ["method=nope"], "error"),
              ("method=full", PROFILE_FAST + ["method=full"], "error"),
              ("task=ruler/nope", merge(PROFILE_FAST, ["task=ruler/nope"]), "error"),
              ("task=longbench/qasper-no-data",
               merge(PROFILE_FAST, ["task=longbench/qasper", "task.data_dir={tmp}/empty"]), "error")]
    for label, args, expect in shared:
        yield Case(f"kvbench-profile/{label}", "kvbench-profile", args, expect, label)
    yield Case("kvbench-profile/task=random", "kvbench-profile", merge(PROFILE_FAST, ["task=random"]), "ok",
               "task=random (documented)")


def reproduce_cases() -> Iterator[Case]:
    """kvbench-reproduce: an unknown paper; per paper a dry run (must pass) and a misspelt override; bad flags,
    groups and values; --out that cannot be written (a real run of one small job: a dry run writes nothing)."""
    import yaml

    papers = group_options("paper")
    yield Case("kvbench-reproduce/nope", "kvbench-reproduce", ["nope", "--dry-run"], "error", "paper nope")
    yield Case("kvbench-reproduce/no-args", "kvbench-reproduce", [], "error", "(no arguments)")
    tops = ["keep_ratio", "context_length", "n_samples", "seed", "query_aware"]
    for i, paper in enumerate(papers):
        yield Case(f"kvbench-reproduce/{paper}/dry-run", "kvbench-reproduce", [paper, "--dry-run"], "ok", "--dry-run")
        override = f"{typo(tops[i % len(tops)], i)}=1"
        yield Case(f"kvbench-reproduce/{paper}/typo/{override}", "kvbench-reproduce", [paper, "--dry-run", override],
                   "error", override)
    paper = papers[0]
    for arg in ("notanoverride", "method=nope", "model=nope", "n_samples=abc", "keep_ratio=2.0"):
        yield Case(f"kvbench-reproduce/{paper}/{arg}", "kvbench-reproduce", [paper, "--dry-run", arg], "error", arg)
    first = yaml.safe_load((CONF / "paper" / f"{paper}.yaml").read_text())["paper"]["grid"]["methods"][0]["label"]
    one_job = [paper, f"--methods={first}", "model=tiny-random", "n_samples=1", "max_new_tokens=2", "progress=false"]
    for case in flag_cases("kvbench-reproduce", REPO / "harness" / "reproduce.py", [paper, "--dry-run"]):
        if "{tmp}" in case.shown:  # a path: checked by a run, not by a dry run
            case.args = one_job + [case.shown]
        yield case


def command_cases(keys: list[Key]) -> Iterator[Case]:
    yield from report_cases()
    yield from profile_cases([k for k in keys if k.command == "kvbench" and "." not in k.path])
    yield from reproduce_cases()
    yield Case("kvbench-train/--nope", "kvbench-train", TRAIN_FAST + ["--nope"], "error", "--nope")
    yield from flag_cases("kvbench-train-reference", REFERENCE / "train.py", TRAIN_REFERENCE_FAST)
    yield from pickle_cases()


def all_cases() -> list[Case]:
    keys, train = compose_tree()
    # kvbench-train shares Hydra's handling with kvbench: fewer values per key, one typo per section
    sections = list({k.path.split(".")[0] if "." in k.path else "": k for k in train}.values())
    cases = [*override_cases(keys), *override_cases(train, most=2), *typo_cases(keys + sections), *group_cases(),
             *run_dir_override_cases(),
             *input_file_cases(), *resume_cases(), *command_cases(keys)]
    ids = Counter(c.id for c in cases)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    return cases


# ---------------------------------------------------------------------------------------------- running one
ENV = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {
    "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def execute(argv: list[str], cwd: Path, timeout: float) -> tuple[int, str, float, bool]:
    """(exit status, stdout+stderr, seconds, hung): a hung command's whole process group is killed."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        hung = True
    return proc.returncode, out.decode("utf-8", "replace"), time.perf_counter() - start, hung


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.is_dir() else {}


def lost_files(before: dict[str, bytes], root: Path, appendable: tuple[str, ...]) -> list[str]:
    """Files of ``before`` gone or changed under ``root``; an appendable file may grow after its last whole line."""
    lost = []
    for name, old in before.items():
        path = root / name
        new = path.read_bytes() if path.is_file() else None
        if new is None:
            lost.append(f"{name} gone")
        elif hashlib.sha256(new).digest() != hashlib.sha256(old).digest():
            whole = old[: old.rfind(b"\n") + 1]
            if not (name in appendable and new.startswith(whole)):
                lost.append(f"{name} changed")
    return lost


def shipped_data() -> dict[str, bytes]:
    """The reference model, checkpoints and profile: data no case may touch (the code around them may change)."""
    return {k: v for k, v in snapshot(REFERENCE).items() if not k.endswith((".py", ".pyc"))}


def recorded(tmp: Path, key: str):
    """The value of a dotted key in {tmp}/run/config.yaml (KeyError when the file or the key is missing)."""
    import yaml

    node = yaml.safe_load((tmp / "run" / "config.yaml").read_text())
    for part in key.split("."):
        node = node[part]
    return node


def classify(case: Case, rc: int, text: str, hung: bool, lost: list[str], unpickled: bool,
             value=KeyError) -> tuple[str, str]:
    """(outcome, why) of one finished case; ``value``: what {tmp}/run/config.yaml recorded (KeyError: nothing)."""
    lines = [x for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith(f"{case.command}: error:")]
    if unpickled:
        return "unpickled", f"{case.marker} was written by unpickling an input"
    if lost:
        return "data lost", ", ".join(lost)
    if hung:
        return "hang", "killed at the time limit"
    if rc < 0:
        return "unclean", f"killed by signal {-rc}"
    if "Traceback (most recent call last)" in text:
        return "traceback", f"exit {rc}"
    if rc not in (0, 2) and not errors and ("HYDRA_FULL_ERROR" in text or len(lines) > 1):
        return "traceback", f"exit {rc}, Hydra's multi-line error"
    if case.expect == "ok":
        if rc != 0:
            return "refused", f"exit {rc}"
        if case.want is not None and (value is KeyError or value is not case.want[1]):
            shown = "nothing" if value is KeyError else repr(value)
            return "silent-wrong", f"{case.want[0]} recorded {shown}, not {case.want[1]}"
        return "ok", "exit 0"
    if rc == 0:
        return ("ok", "exit 0 (recovered)") if case.expect == "either" else ("silent", "exit 0")
    if rc == 2 and len(errors) == 1 and not any(TRACE_LINE.match(x) for x in lines):
        return "clean", ""
    other = sorted({m.group(1) for x in lines if (m := re.match(r"^([\w.-]+): error:", x))} - {case.command})
    why = [f"exit {rc}"] + ([f"{len(errors)} error lines"] if len(errors) != 1 else [])
    why += [f"says '{o}: error:'" for o in other]
    why += ["traceback lines"] if any(TRACE_LINE.match(x) for x in lines) else []
    return "unclean", ", ".join(why)


def run_case(case: Case, root: Path, timeout: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=slug(case.id) + "-", dir=root))
    (tmp / "afile").write_text("a regular file\n")
    (tmp / "empty").mkdir()
    record = {"id": case.id, "command": case.command, "shown": case.shown, "expect": case.expect}
    if case.needs and case.needs not in ARTIFACTS:
        return record | {"outcome": "setup failed", "why": SETUP_ERRORS.get(case.needs, "not made"), "rc": None,
                         "seconds": 0.0, "first": "", "last": "", "argv": []}
    try:
        if case.prepare:
            case.prepare(tmp)
    except OSError as err:  # e.g. the good run no longer writes the file this case damages
        return record | {"outcome": "setup failed", "why": f"prepare: {err}", "rc": None, "seconds": 0.0,
                         "first": "", "last": "", "argv": []}
    before = snapshot(tmp / case.watch) if case.watch else {}
    argv = [a.replace("{tmp}", str(tmp)) for a in case.args]
    rc, text, seconds, hung = execute([str(BIN / case.command), *argv], tmp, timeout)
    lost = lost_files(before, tmp / case.watch, case.appendable) if case.watch else []
    value = KeyError
    if case.want is not None:
        try:
            value = recorded(tmp, case.want[0])
        except (OSError, KeyError, TypeError):
            pass
    unpickled = bool(case.marker) and (tmp / case.marker).exists()
    outcome, why = classify(case, rc, text, hung, lost, unpickled, value)
    lines = [x.replace(str(tmp), "<tmp>").strip() for x in text.splitlines() if x.strip()] or [""]
    return record | {"outcome": outcome, "why": why, "rc": rc, "seconds": round(seconds, 1), "first": lines[0][:300],
                     "last": lines[-1][:300], "argv": [case.command] + [a.replace(str(tmp), "<tmp>") for a in argv]}


# -------------------------------------------------------------------------------------------------- report
def summary(results: list[dict]) -> str:
    commands = sorted({r["command"] for r in results})
    used = [o for o in OUTCOMES if any(r["outcome"] == o for r in results)]
    width = max(len(c) for c in commands + ["all"]) + 2
    rows = [f"{'command':<{width}}" + "".join(f"{o:>{len(o) + 2}}" for o in used) + f"{'total':>7}"]
    for command in commands + ["all"]:
        mine = [r for r in results if command in ("all", r["command"])]
        counts = Counter(r["outcome"] for r in mine)
        rows.append(f"{command:<{width}}" + "".join(f"{counts.get(o, 0):>{len(o) + 2}}" for o in used)
                    + f"{len(mine):>7}")
    return "\n".join(rows)


def table(results: list[dict]) -> str:
    """One line per case; the first and last line it printed below (only the last for a clean or ok one)."""
    width = max(len(r["id"]) for r in results) + 2
    rows = []
    for r in results:
        rows.append(f"{r['outcome']:<13}{r['id']:<{width}}{r['seconds'] or 0:>6.1f}s  {r['why']}")
        if r["outcome"] not in GOOD and r["first"] != r["last"]:
            rows.append(f"{'':15}first: {r['first']}")
        rows.append(f"{'':15}last:  {r['last']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    parser.add_argument("--verbose", action="store_true", help="a table of every case")
    parser.add_argument("--json", metavar="PATH", help="write every case's record and the counts here")
    parser.add_argument("--only", metavar="REGEX", help="run only the cases whose id matches")
    parser.add_argument("--list", action="store_true", help="list the cases, run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the cases' working dirs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a case is not clean or ok")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.timeout <= 0:
        parser.error("--jobs and --timeout must be positive")
    cases = [c for c in all_cases() if not args.only or re.search(args.only, c.id)]
    if args.list:
        for c in cases:
            print(f"{c.id:<70} {c.expect:<7} {c.command} {' '.join(c.args)}")
        print(f"{len(cases)} cases")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import machine

    where = machine()
    print("machine:", json.dumps(where), flush=True)
    root = Path(tempfile.mkdtemp(prefix="kvbench-hostile-"))
    guarded = shipped_data()
    try:
        make_setups(root, {c.needs for c in cases if c.needs}, args.timeout, args.jobs)
        results = run_all(cases, root, args.timeout, args.jobs)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    touched = lost_files(guarded, REFERENCE, ())
    if touched:
        print(f"WARNING: shipped files changed during the campaign: {', '.join(touched)}", flush=True)
    if args.verbose:
        print(table(results))
    bad = [r for r in results if r["outcome"] not in GOOD]
    print(f"\n{len(results)} cases, {len(bad)} not clean/ok, timeout {args.timeout:g}s, {args.jobs} jobs"
          + (f", working dirs kept in {root}" if args.keep else ""))
    print(summary(results))
    if args.json:
        counts = Counter(r["outcome"] for r in results)
        Path(args.json).write_text(json.dumps({"machine": where, "timeout": args.timeout, "counts": counts,
                                               "setup_errors": SETUP_ERRORS, "cases": results}, indent=1) + "\n")
    return 1 if args.strict and bad else 0


def run_all(cases: list[Case], root: Path, timeout: float, jobs: int) -> list[dict]:
    done: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(run_case, c, root, timeout) for c in cases]):
            result = future.result()
            done[result["id"]] = result
            print(f"[{len(done)}/{len(cases)}] {result['outcome']:<12} {result['id']}", file=sys.stderr, flush=True)
    return [done[c.id] for c in cases]


if __name__ == "__main__":
    sys.exit(main())
