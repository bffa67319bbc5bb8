"""Every config the repository ships is built and run here, so a new ``methods/x.py`` + ``conf/method/x.yaml`` (or a
new task yaml) is covered without writing a test:

* each part config (``conf/method/{scorer,allocator}/<name>.yaml``) names a registered part and lists exactly its
  class's parameters with the class's defaults, and every registered part has one;
* each method config composes, builds, and runs one sample end to end (the real runner, on the shipped reference
  model, whose learned checkpoints and profiles the learned methods load by default);
* each task config composes and its loader builds one sample (from the repository's fixtures where the task reads
  files).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import methods
from harness.cli import group_options
from harness.compress import ALLOCATORS, SCORERS, n_keep
from harness.overrides import Composer

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FIXTURES = ROOT / "tests" / "fixtures"
methods.load_all()
KINDS = {"scorer": SCORERS, "allocator": ALLOCATORS}
PART_FILES = [(kind, p.stem) for kind in KINDS for p in sorted((CONF / "method" / kind).glob("*.yaml"))]


def compose(*overrides):
    with Composer(CONF, "config") as composer:
        return composer.compose(list(overrides))


@pytest.mark.parametrize("kind, name", PART_FILES, ids=[f"{k}/{n}" for k, n in PART_FILES])
def test_part_config_lists_the_class_parameters_with_its_defaults(kind, name):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "method" / kind / f"{name}.yaml"), resolve=False)
    assert raw.pop("name") == name and name in KINDS[kind]
    cls = KINDS[kind][name]
    defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    # a wrapped scorer's base is a scorer node: its file names it in its defaults list (- /method/scorer@base: x)
    chosen = {k.split("@", 1)[1]: v for entry in raw.pop("defaults", []) if isinstance(entry, dict)
              for k, v in entry.items() if "@" in k}
    raw = {**{k: chosen[k] for k in defaults if k in chosen}, **raw}
    assert list(raw) == list(defaults), f"{kind}/{name}.yaml keys differ from {cls.__name__}.__init__"
    for key, value in raw.items():
        if isinstance(value, str) and value.startswith("${"):  # follows another key of the method (n_sink)
            continue
        assert value == defaults[key], f"{kind}/{name}.yaml {key}: {value!r} vs the class's {defaults[key]!r}"


def test_a_method_config_may_give_its_parts_inline():
    """A new method needs no part file: its config may name the scorer inline with its parameters."""
    cfg = {"name": "snapkv", "scorer": {"name": "snapkv", "window": 8}, "selector": {"n_recent": 8}}
    method = methods.build_method(cfg)
    assert (method.scorer.window, method.scorer.kernel, type(method.allocator).__name__) == (8, 7, "UniformAllocator")
    assert method.selector.n_recent == 8 and method.config["scorer"] == {"name": "snapkv", "window": 8}


@pytest.mark.parametrize("name", methods.config_names())
def test_method_config_builds_and_runs_one_sample(tmp_path, name):
    from harness.io import read_rows
    from harness.runner import run

    cfg = compose(f"method={name}", "model=reference", "task=ruler/niah_single_1", "context_length=512",
                  "n_samples=1", "keep_ratio=[0.25,1.0]", "max_new_tokens=4", "progress=false")
    method = methods.build_method(cfg.method)
    assert method.config["name"] == name  # a config's name is its file's (a part swap is traced back to it)
    run(cfg, tmp_path)
    rows = read_rows(tmp_path / "predictions.jsonl")[0]
    assert sorted(r["keep_ratio"] for r in rows) == [0.25, 1.0] and {r["method"] for r in rows} == {method.name}
    by_ratio = {r["keep_ratio"]: r for r in rows}
    assert all(isinstance(r["prediction"], str) for r in rows)
    full = by_ratio[1.0]
    if name != "spkv":  # keep 1.0 keeps everything (SP-KV's budget is its gates', whatever the ratio)
        assert full["kv_bytes"] == full["kv_bytes_full"]
    squeezed = by_ratio[0.25]
    if not method.compresses:
        assert squeezed["kv_bytes"] == squeezed["kv_bytes_full"]
    elif name == "spkv":  # decides its own budget per input; it never keeps more than the context
        assert squeezed["kept_tokens"] <= squeezed["context_tokens"]
    elif name == "think":  # prunes key channels, not tokens: every token stays, in narrower keys
        assert squeezed["kept_tokens"] == squeezed["context_tokens"] and squeezed["kv_bytes"] < squeezed["kv_bytes_full"]
        # keys keep the channel share s = 0.25 except the last `recent` whole; values stay whole
        recent, n_tokens = method.scorer.recent, squeezed["context_tokens"]
        want = (1 + 0.25) / 2 + (1 - 0.25) * min(recent, n_tokens) / (2 * n_tokens)
        assert squeezed["kv_bytes"] / squeezed["kv_bytes_full"] == pytest.approx(want, abs=0.01)
    else:  # the budget the ratio asks for, on average over heads (a ragged method moves entries between heads)
        assert squeezed["kv_bytes"] < squeezed["kv_bytes_full"]
        assert squeezed["kept_tokens"] <= n_keep(squeezed["context_tokens"], 0.25, method.budget_rule) + 1e-6
        # the bytes held are the ratio's, whatever moves between layers and heads (whole chunks: ChunkKV rounds)
        assert abs(squeezed["kv_bytes"] / squeezed["kv_bytes_full"] - 0.25) <= 0.02, name


@pytest.mark.parametrize("name, overrides, label", [
    ("full", ["scorer=snapkv"], "snapkv"), ("snapkv", ["scorer=tova"], "tova"), ("lkv", ["scorer=snapkv"], "snapkv+lkv"),
    ("snapkv_adakv", ["allocator=pyramid"], "snapkv+pyramid"), ("snapkv", ["allocator=adakv"], "snapkv+adakv"),
    ("lkv", [], "lkv"), ("lkv", ["allocator=uniform"], "lkv+uniform"), ("snapkv", ["scorer=tova", "label=mine"], "mine"),
])
def test_a_swapped_part_names_the_rows_by_their_parts(name, overrides, label):
    """Rows never carry a file's label for another composition (method=lkv method.allocator=uniform is LKV-T alone,
    not LKV); the values the file set for the part it replaced are gone (lkv's min_budget, checkpoint follows)."""
    method = methods.load(name, *overrides)
    assert method.name == label
    if name == "lkv" and overrides == ["scorer=snapkv"]:
        assert method.allocator.checkpoint == "harness/reference/lkv" and method.allocator.min_budget == 16


def _data_dir(option: str, node) -> str | None:
    """The repository's fixture for a task that reads files (official formats), None for one that does not."""
    if "data_dir" not in node:
        return None
    if option.startswith("infinitebench"):  # the official files (the generated tasks read them when there)
        return str(FIXTURES / "infinitebench")
    if option == "math" or option.startswith("math/"):
        return str(FIXTURES / "math")
    if option.startswith("longbench_v2"):
        return str(FIXTURES / "longbench_v2")
    if option.startswith("longbench"):
        return str(FIXTURES / "longbench")
    if option == "ruler_kvpress":
        return str(FIXTURES / "kvpress_ruler" / "4096")
    if option in ("ruler/qa_1", "ruler/qa_2"):  # they read SQuAD / HotpotQA (the suite's run without them below)
        return str(FIXTURES / "ruler")
    return None


def _fixture_tasks(data_dir: str) -> set[str]:
    """The tasks kvpress's RULER fixture holds rows of (the suite's others are excluded, as a user would)."""
    rows = [json.loads(line) for f in Path(data_dir).glob("*.jsonl") for line in f.read_text().splitlines() if line]
    return {r["task"] for r in rows}


TASK_OPTIONS = group_options("task")


@pytest.fixture(scope="module")
def encoder():
    from transformers import AutoTokenizer

    from tasks.base import PromptEncoder

    return PromptEncoder(AutoTokenizer.from_pretrained(ROOT / "harness" / "reference" / "checkpoint"))


@pytest.mark.parametrize("option", TASK_OPTIONS)
def test_task_config_composes_and_builds_one_sample(option, encoder):
    import tasks
    from harness.runner import check_config, suite_tasks, task_params

    context = 4096 if option == "ruler_kvpress" else 2048
    base = compose(f"task={option}")
    data = _data_dir(option, base.task)
    extra = [f"task.data_dir={data}"] if data else []
    if option == "ruler":  # the suite's data_dir is also where its NIAH tasks read essays: run it without qa
        extra.append("task.exclude=[qa_1,qa_2]")
    if option == "ruler_kvpress":
        held = _fixture_tasks(data)
        names = [n.split("/", 1)[1] for n in tasks.expand("ruler_kvpress")]
        extra.append(f"task.exclude=[{','.join(n for n in names if n not in held)}]")
    cfg = compose(f"task={option}", "model=reference", f"context_length={context}", "n_samples=1", *extra)
    check_config(cfg, model_files=False)
    names = suite_tasks(cfg.task)
    assert names
    for name in names:
        suite = None if name == cfg.task.name else str(cfg.task.name)
        task = tasks.get_task(name, suite=suite, **task_params(cfg.task))
        samples = list(task.samples(encoder, context, 1, 0))
        assert samples, name  # one per length of the task's grid (NIAH: per length x depth cell)
        assert {s.meta.get("context_length", context) for s in samples} <= set(task.lengths(context)), name
        for sample in samples:
            assert sample.context and sample.answers, name
            assert encoder.count_sample(sample) <= sample.meta.get("context_length", context), name
            json.dumps(list(sample.answers))  # rows store the answers as JSON
