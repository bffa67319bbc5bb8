"""Published numbers are traceable: every cell names its source, a cell with a number its configuration and
whether it is approximate; a preset breaking this is refused when it loads; the report carries all three;
presets cite primary sources, never a machine path; grid tasks may run at their own context lengths."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from harness.errors import KvbenchError

CONF = Path(__file__).resolve().parent.parent / "conf"


def paper(**cell) -> dict:
    base = {"model": "m", "method": "snapkv", "keep_ratio": 0.5, "task": "ruler", "score": 80.0, "source": "s"}
    return {"name": "p", "sources": {"s": "Table 1 of P (arXiv 0000.00000)"},
            "configs": {"snapkv": "SnapKVPress(), query-agnostic"}, "published": [{**base, **cell}]}


@pytest.mark.parametrize("cell, needle", [
    ({"source": None}, "has no source"),
    ({"source": ""}, "has no source"),
    ({"source": "elsewhere"}, "names source 'elsewhere', which paper.sources lacks"),
    ({"method": "knorm"}, "has a score but no configuration"),
    ({"config": "other"}, "names config 'other', which paper.configs lacks"),
    ({"approximate": "yes"}, "approximate: 'yes'"),
])
def test_untraceable_cells_are_refused(cell, needle):
    from harness.published import check_published

    node = paper(**cell)
    if cell.get("source", "s") is None:
        del node["published"][0]["source"]
    with pytest.raises(KvbenchError) as err:
        check_published(node, "conf/paper/p.yaml")
    assert needle in str(err.value) and "conf/paper/p.yaml" in str(err.value) and "\n" not in str(err.value)


def test_traceable_cells_pass():
    from harness.published import cell_config, check_published

    check_published(paper(), "x")
    check_published(paper(method="knorm", score=None), "x")  # an unknown number needs no configuration
    check_published(paper(method="knorm", config="snapkv", approximate=True), "x")
    assert cell_config(paper(), paper()["published"][0]) == "snapkv"


def _preset_dir(tmp_path, monkeypatch, edit):
    import harness.reproduce as rp

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    path = conf / "paper" / "kvpress_ruler4k.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw["paper"])
    path.write_text("# @package _global_\n" + yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setattr(rp, "CONF_DIR", conf)
    return rp


def test_preset_with_a_cell_without_source_is_refused_when_it_loads(tmp_path, monkeypatch):
    def drop_source(node):
        cell = next(c for c in node["published"] if c["score"] is not None)
        del cell["source"]

    rp = _preset_dir(tmp_path, monkeypatch, drop_source)
    with pytest.raises(KvbenchError) as err:
        rp.load_preset("kvpress_ruler4k")
    assert "conf/paper/kvpress_ruler4k.yaml" in str(err.value) and "has no source" in str(err.value)
    with pytest.raises(KvbenchError, match="has no source"):
        rp.plan("kvpress_ruler4k", ["model=tiny-random"])


def test_preset_with_an_unconfigured_number_is_refused(tmp_path, monkeypatch):
    def drop_config(node):
        del node["configs"]["snapkv"]

    rp = _preset_dir(tmp_path, monkeypatch, drop_config)
    with pytest.raises(KvbenchError, match="has a score but no configuration"):
        rp.load_preset("kvpress_ruler4k")


def test_report_carries_source_config_and_approximate(tmp_path):
    import pandas as pd

    from harness.published import side_by_side, to_csv, to_latex, to_markdown

    node = paper(approximate=True, model="tiny", note="read from Figure 2")
    df = pd.DataFrame([{"model": "tiny", "method": "snapkv", "keep_ratio": 0.5, "task": "ruler/vt", "score": 0.75,
                        "failed": False, "paper": "p"}])
    table = side_by_side(df, node)
    row = table.iloc[0]
    assert (row.published, bool(row.approximate), row.source, row.config) == (80.0, True, "s", "snapkv")
    md = to_markdown(table, {"p": node})
    assert "≈80.0" in md and "SnapKVPress(), query-agnostic" in md and "Table 1 of P" in md
    assert r"$\approx$80.0" in to_latex(table, {"p": node})
    csv = pd.read_csv(__import__("io").StringIO(to_csv(table, {"p": node})))
    assert csv.iloc[0].config_text == "SnapKVPress(), query-agnostic" and bool(csv.iloc[0].approximate)


def test_report_refuses_a_run_config_with_an_unsourced_cell(tmp_path):
    from harness.published import paper_nodes
    import pandas as pd

    run = tmp_path / "run"
    run.mkdir()
    node = paper()
    del node["published"][0]["source"]
    (run / "config.yaml").write_text(yaml.safe_dump({"paper": node}))
    with pytest.raises(KvbenchError, match="has no source; .*remove the run dir from the report"):
        paper_nodes(pd.DataFrame({"run_dir": [str(run)]}))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "paper").glob("*.yaml")))
def test_presets_cite_no_machine_path(name):
    """Sources are primary (a repository file at a commit, a paper, a URL), never a local file: no absolute
    path, no parent-relative path, no /work/ in any preset or its per-model file."""
    texts = [(CONF / "paper" / f"{name}.yaml").read_text()]
    texts += [p.read_text() for p in (CONF / "paper_model").glob(f"{name}_*.yaml")]
    for text in texts:
        assert "../" not in text and "/work/" not in text and "METHODS.md" not in text
        assert not re.search(r"(?<![\w.:/])/(home|tmp|mnt|ssd\d*|root|data)/", text.replace("/data/kvpress", ""))


def test_numbers_only_with_primary_sources():
    """Every number in conf/paper comes with a source that names a commit, an arXiv id or a URL."""
    for path in sorted((CONF / "paper").glob("*.yaml")):
        node = yaml.safe_load(path.read_text())["paper"]
        for cell in node["published"]:
            if cell["score"] is None:
                continue
            text = node["sources"][cell["source"]]
            assert re.search(r"\b[0-9a-f]{7,40}\b|arXiv \d{4}\.\d{4,5}|https?://|huggingface\.co", text), (path, cell)


def test_grid_tasks_with_their_own_context_lengths():
    from harness.reproduce import plan, task_groups

    longbench = {"name": "longbench", "context_length": [32000], "overrides": ["++task.exclude=[vcsum]"]}
    grid = {"tasks": ["ruler", longbench, {"name": "ruler_kvpress"}], "context_length": [4096]}
    assert task_groups(grid) == [(["ruler", "ruler_kvpress"], [4096], []),
                                 (["longbench"], [32000], ["++task.exclude=[vcsum]"])]
    _, jobs = plan("lukv_ruler_longbench", ["model=tiny-random"], methods=["lukv"])
    assert [[o for o in j["overrides"] if o.startswith(("task=", "context_length="))] for j in jobs] == [
        ["task=ruler", "context_length=4096"], ["task=longbench", "context_length=120000"]]
    assert any(o.startswith("++task.exclude=") for o in jobs[1]["overrides"])
    _, jobs = plan("lukv_ruler_longbench", ["model=tiny-random"], methods=["lukv"], tasks=["longbench"])
    assert len(jobs) == 1 and "task=longbench" in jobs[0]["overrides"]
