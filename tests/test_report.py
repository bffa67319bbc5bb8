"""Report tables against a fixed, hand-written results dir (tests/fixtures/report/runs: 2 methods x 2 keep ratios
x 2 tasks, 2 samples each, plus 3 failed rows, each run's config.yaml with a paper node), and the paper presets.

Hand-computed (scores x100; see tests/fixtures/report/README.md):
  snapkv 0.5:  niah (1, 1) = 100, vt (1, .5) = 75  -> suite mean 87.5 vs published 90 -> -2.5
  snapkv 0.25: niah (1, 0) = 50 vs published 40 (task cell) -> +10
  knorm 0.25:  niah (0, 0) = 0, vt (0, .5) = 25    -> suite mean 12.5 vs published 20 -> -7.5
  evidence retention (niah only): snapkv 0.5 (.9+.7)/2 = .8, 0.25 (.6+.2)/2 = .4; knorm 0.5 (.8+.4)/2 = .6 (a
  failed row carrying a stale 0.0 is excluded), 0.25 (.1+.3)/2 = .2
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.errors import KvbenchError

FIXTURE = Path(__file__).parent / "fixtures" / "report"
RUNS = FIXTURE / "runs"
EXPECTED = FIXTURE / "expected"
CONF = Path(__file__).resolve().parent.parent / "conf"
FROZEN = ["published.md", "published.tex", "published.csv", "evidence_retention.csv",
          "evidence_retention_by_layer.csv", "summary.csv"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from harness.report import write_report

    out = tmp_path_factory.mktemp("report")
    paths = write_report(RUNS, out)
    return out, paths


@pytest.mark.parametrize("name", FROZEN)
def test_tables_match_frozen(report, name):
    out, paths = report
    assert out / name in paths
    assert (out / name).read_text() == (EXPECTED / name).read_text(), f"{name} differs from {EXPECTED / name}"


def test_published_cells_hand_computed(report):
    out, _ = report
    t = pd.read_csv(out / "published.csv")
    cell = lambda **kw: t[(t[list(kw)] == pd.Series(kw)).all(axis=1)].iloc[0]  # noqa: E731
    c = cell(model="tiny-llama", method="snapkv", keep_ratio=0.5, task="ruler")
    assert (c.ours, c.published, c.delta, c.tasks, c.n) == (87.5, 90.0, -2.5, 2, 4)
    c = cell(model="tiny-llama", method="snapkv", keep_ratio=0.25, task="ruler/niah_single_1")
    assert (c.ours, c.published, c.delta, c.tasks) == (50.0, 40.0, 10.0, 1)
    c = cell(model="tiny-llama", method="knorm", keep_ratio=0.25, task="ruler")
    assert (c.ours, c.published, c.delta, c.note) == (12.5, 20.0, -7.5, "approximate")
    c = cell(model="tiny-llama", method="knorm", keep_ratio=0.5, task="ruler")
    assert c.ours == 50.0 and pd.isna(c.published) and pd.isna(c.delta)  # unknown stays unknown
    c = cell(model="big-model", method="snapkv")
    assert pd.isna(c.ours) and c.published == 95.0  # published, not run
    assert len(t) == 5  # rows with neither number (big-model knorm, full) are left out
    assert "unknown" in (out / "published.md").read_text()


def test_evidence_retention_mean_and_failed_rows(report):
    out, _ = report
    ev = pd.read_csv(out / "evidence_retention.csv")
    got = {(r.method, r.keep_ratio): (r.evidence_retention, r.n, r.n_failed) for r in ev[ev.task == "all"].itertuples()}
    assert got == {("snapkv", 0.5): (0.8, 2, 1), ("snapkv", 0.25): (0.4, 2, 1),
                   ("knorm", 0.5): (0.6, 2, 1), ("knorm", 0.25): (0.2, 2, 0)}
    assert set(ev.task) == {"ruler/niah_single_1", "all"}  # vt marks no evidence
    summary = (out / "summary.md").read_text()
    assert "| snapkv | 0.5 | 100.0 | 75.0 | 87.5 | 80.0 |" in summary  # evidence column beside the score
    assert "| knorm | 0.5 | 50.0 | 50.0 | 50.0 | 60.0 |" in summary
    assert "19 rows, 3 failed" in summary and "## Failed samples" in summary
    s = pd.read_csv(out / "summary.csv")
    assert int(s.n_errors.sum()) == 3 and int(s.n.sum()) == 16


def test_figures_png_and_pdf(report):
    out, paths = report
    for stem in ("score_vs_keep_ratio", "score_vs_kv_bytes", "score_vs_keep_ratio_by_group", "task_heatmap",
                 "niah_depth_ruler_niah"):  # one context length: score vs depth, not a heatmap
        for ext in ("png", "pdf"):
            assert out / f"{stem}.{ext}" in paths and (out / f"{stem}.{ext}").stat().st_size > 0


def test_stand_in_model_is_compared_and_marked(tmp_path):
    from harness.published import paper_nodes, side_by_side
    from harness.report import load_rows

    df = load_rows(RUNS)
    df["model"] = "reference"  # a model the paper never ran: compared against every paper model's cells
    paper = paper_nodes(df)["fixture_paper"]
    t = side_by_side(df, paper)
    assert set(t.ours_model) == {"reference"}
    big = t[(t.model == "big-model") & (t.method == "snapkv")].iloc[0]
    assert (big.ours, big.published) == (87.5, 95.0)


def test_no_paper_node_no_published_tables(tmp_path):
    from harness.report import write_report

    runs = tmp_path / "runs"
    shutil.copytree(RUNS, runs)
    for cfg in runs.rglob("config.yaml"):
        cfg.unlink()
    names = {p.name for p in write_report(runs, tmp_path / "out")}
    assert "summary.md" in names and not any(n.startswith("published.") for n in names)


def test_task_groups():
    from harness.figures import task_group

    assert task_group("ruler/niah_multikey_2") == "RULER NIAH"
    assert task_group("ruler/vt") == "RULER other"
    # LongBench's categories are the ones its task module declares (README names), not a copy in harness/
    assert task_group("longbench/hotpotqa") == "LongBench Multi-Doc QA"
    assert task_group("longbench_e/gov_report") == "LongBench Summarization"
    assert task_group("longbench_e/gov_report_e") == "LongBench Summarization"  # LongBench-E's file stem
    assert task_group("longbench/no_such_dataset") == "LongBench other"
    import tasks

    for name in tasks.expand("longbench") + tasks.expand("longbench_e"):
        assert task_group(name) == f"LongBench {tasks.get_task(name).info['category']}"


# ---- paper presets -------------------------------------------------------------------------------------------

PRESETS = sorted(p.stem for p in (CONF / "paper").glob("*.yaml"))


def test_presets_listed():
    assert {"kvpress_ruler4k", "lkv_longbench", "lukv_ruler_longbench", "spkv", "asl_ruler_niah"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_or_fails_clearly(name):
    """Every preset names methods/tasks/models that exist (and composes with `paper=<name>`), or fails with one
    line naming the missing file."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.reproduce import load_preset, task_name

    try:
        paper = load_preset(name)
    except KvbenchError as err:
        msg = str(err)
        assert "\n" not in msg and f"paper={name} needs conf/" in msg
        named = [w.rstrip(",") for w in msg.split() if w.startswith("conf/")]
        assert named and all(not (CONF.parent / p).exists() for p in named)
        return
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"paper={name}"])
    GlobalHydra.instance().clear()
    assert cfg.paper.name == name
    grid = paper["grid"]
    assert [float(r) for r in cfg.keep_ratio] == [float(r) for r in grid["keep_ratio"]]
    assert int(cfg.context_length) == int(grid["context_length"][0])
    for m in grid["methods"]:
        assert (CONF / "method" / f"{m['method']}.yaml").exists()
    for t in grid["tasks"]:
        assert (CONF / "task" / f"{task_name(t)}.yaml").exists()


def test_kvpress_preset_on_reference_model_is_the_offline_variant():
    """paper=kvpress_ruler4k model=reference drops the two RULER tasks that need SQuAD/HotpotQA files and runs
    20 samples per task; a command-line override still wins; other models keep the full 13-task grid."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from harness.runner import suite_tasks

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        ref = compose("config", overrides=["paper=kvpress_ruler4k", "model=reference"])
        ref_n = compose("config", overrides=["paper=kvpress_ruler4k", "model=reference", "n_samples=3",
                                             "task.exclude=[]"])
        toy = compose("config", overrides=["paper=kvpress_ruler4k", "model=tiny-random"])
        plain = compose("config", overrides=["model=reference"])
    GlobalHydra.instance().clear()
    assert list(ref.task.exclude) == ["qa_1", "qa_2"] and ref.n_samples == 20
    names = suite_tasks(ref.task)
    assert len(names) == 11 and "ruler/qa_1" not in names and "ruler/vt" in names
    assert ref_n.n_samples == 3 and len(suite_tasks(ref_n.task)) == 13
    assert toy.n_samples == 500 and len(suite_tasks(toy.task)) == 13
    assert plain.n_samples == 10 and "exclude" not in OmegaConf.to_container(plain.task)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_published_cells(name):
    """Published cells: numbers only with a known source and configuration, null otherwise; no cell twice."""
    from omegaconf import OmegaConf

    from harness.published import cell_config

    paper = OmegaConf.to_container(OmegaConf.load(CONF / "paper" / f"{name}.yaml"))["paper"]
    sources = paper["sources"]
    keys = set()
    for p in paper["published"]:
        assert set(p) >= {"model", "method", "keep_ratio", "task", "score", "source"}, p
        assert p["source"] in sources, p
        assert p["score"] is None or cell_config(paper, p) in (paper.get("configs") or {}), p
        assert isinstance(p.get("approximate", False), bool), p
        assert p["score"] is None or isinstance(p["score"], (int, float))
        assert 0.0 < float(p["keep_ratio"]) <= 1.0
        key = (p["model"], p["method"], float(p["keep_ratio"]), p["task"], p.get("context_length"))
        assert key not in keys, key
        keys.add(key)
    for n in paper.get("notes") or []:
        assert n["source"] in sources and n["claim"]


def test_kvpress_published_numbers():
    """The numbers read from kvpress's two committed leaderboard figures (approximate), at keep_ratio =
    1 - compression; nothing for Qwen3-8B (no primary source); every grid cell listed."""
    from omegaconf import OmegaConf

    paper = OmegaConf.to_container(OmegaConf.load(CONF / "paper" / "kvpress_ruler4k.yaml"))["paper"]
    cells = {(p["model"], p["method"], p["keep_ratio"]): p["score"] for p in paper["published"]}
    llama, qwen = "Llama-3.1-8B-Instruct", "Qwen3-8B"
    known = {(llama, "full", 1.0): 95.4,
             (llama, "snapkv", 0.75): 80.3, (llama, "snapkv", 0.5): 67.0, (llama, "snapkv", 0.25): 40.0,
             (llama, "snapkv_query_aware", 0.75): 94.0, (llama, "snapkv_query_aware", 0.5): 88.1,
             (llama, "expected_attention", 0.75): 87.6, (llama, "expected_attention", 0.5): 74.7,
             (llama, "expected_attention", 0.25): 52.7, (llama, "expected_attention+adakv", 0.5): 91.5,
             (llama, "knorm", 0.75): 74.5, (llama, "knorm", 0.5): 49.7, (llama, "streaming_llm", 0.75): 78.2,
             (llama, "tova", 0.75): 86.5, (llama, "tova", 0.5): 75.5, (llama, "tova", 0.25): 64.2,
             (llama, "random", 0.75): 63.0, (llama, "random", 0.5): 7.7, (llama, "random", 0.25): 0.5,
             (llama, "observed_attention", 0.75): 72.9, (llama, "observed_attention", 0.5): 50.8,
             (llama, "observed_attention", 0.25): 28.9, (llama, "pyramidkv", 0.75): 81.6}
    assert {k: v for k, v in cells.items() if v is not None} == known
    assert all(p["approximate"] for p in paper["published"] if p["score"] is not None)  # read from plots
    methods = {m["label"]: m for m in paper["grid"]["methods"]}
    assert methods["expected_attention+adakv"]["method"] == "expected_attention_adakv_e2"  # AdaKV(EA eps 1e-2)
    assert "query_aware=true" in methods["snapkv_query_aware"]["overrides"]
    assert [float(r) for r in paper["grid"]["keep_ratio"]] == [0.75, 0.5, 0.25, 0.125]  # cr 0.875 included
    for model in (llama, qwen):
        for m in paper["grid"]["methods"]:
            for r in m.get("keep_ratio") or paper["grid"]["keep_ratio"]:
                assert (model, m["label"], float(r)) in cells, (model, m["label"], r)


def test_missing_method_fails_with_one_line(tmp_path, monkeypatch):
    import harness.reproduce as rp

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "method" / "expected_attention_adakv_e2.yaml").unlink()
    monkeypatch.setattr(rp, "CONF_DIR", conf)
    with pytest.raises(KvbenchError) as err:
        rp.load_preset("kvpress_ruler4k")
    assert "\n" not in str(err.value) and "conf/method/expected_attention_adakv_e2.yaml" in str(err.value)
    # leaving it out explicitly works
    paper = rp.load_preset("kvpress_ruler4k", methods=["snapkv", "knorm"])
    assert [m["label"] for m in paper["grid"]["methods"]] == ["knorm", "snapkv"]  # in the grid's order


def test_reproduce_plan_stand_in_and_overrides():
    from harness.reproduce import plan

    paper, jobs = plan("kvpress_ruler4k", ["model=tiny-random", "n_samples=2", "keep_ratio=[0.5]"],
                       methods=["full", "snapkv_query_aware"])
    assert [j["label"] for j in jobs] == ["full", "snapkv_query_aware"]
    assert all(j["sweep_dir"] == "results/paper/kvpress_ruler4k/tiny-random" for j in jobs)
    full, snap = (j["overrides"] for j in jobs)
    assert "keep_ratio=[1.0]" in full and "keep_ratio=[0.5]" not in full  # full cache keeps its own ratio
    assert "keep_ratio=[0.5]" in snap and "query_aware=true" in snap and "model=tiny-random" in snap
    assert "paper=kvpress_ruler4k" in snap and "task=ruler" in snap
    _, jobs = plan("kvpress_ruler4k", [], methods=["snapkv"])  # the grid's own models
    assert [j["model"] for j in jobs] == ["Llama-3.1-8B-Instruct", "Qwen3-8B"]
    assert "model.path=Qwen/Qwen3-8B" in jobs[1]["overrides"]


def test_reproduce_labels_rows_as_the_runner_does():
    """kvbench-reproduce's sweep dir and job model are the label kvbench's rows carry (runner.model_label of the
    composed model config): the config's default model when no model= is given, the checkpoint dir's name for hf."""
    from harness.reproduce import model_label, plan

    assert model_label(["model=tiny-random"]) == "tiny-random"
    assert model_label(["model=hf", "model.path=/ckpt/Qwen3-8B/"]) == "Qwen3-8B"
    assert model_label(["model.dtype=float32"]) == "reference"  # conf/config.yaml's default model, not tiny-random
    _, jobs = plan("kvpress_ruler4k", ["model.dtype=float32"], methods=["snapkv"])
    assert {j["model"] for j in jobs} == {"reference"}
    assert all(j["sweep_dir"].endswith("/kvpress_ruler4k/reference") for j in jobs)


def test_budget_heatmap_over_models_of_different_shapes(tmp_path):
    """Runs of two models (2 vs 4 layers) under one method and ratio: one panel each, no mean across shapes."""
    import pandas as pd

    from harness.figures import budget_heatmap

    rows = [{"model": "small", "method": "snapkv+adakv", "keep_ratio": 0.5, "failed": False, "context_tokens": 100,
             "budgets": [[30, 70], [50, 50]]},
            {"model": "deep", "method": "snapkv+adakv", "keep_ratio": 0.5, "failed": False, "context_tokens": 100,
             "budgets": [[20, 80], [50, 50], [50, 50], [60, 40]]},
            {"model": "deep", "method": "snapkv", "keep_ratio": 0.5, "failed": False, "context_tokens": 100,
             "budgets": [[50, 50]] * 4}]  # uniform: no panel
    files = budget_heatmap(pd.DataFrame(rows), tmp_path)  # it used to stack the two shapes and raise
    assert {f.suffix for f in files} >= {".png"} and all(f.stat().st_size > 0 for f in files)


def test_reproduce_passes_a_part_key_only_to_the_methods_that_have_it():
    """A part's keys are fixed by its class: method.allocator.profile= reaches lukv's jobs and no other; a part
    key no grid method has is refused in one line."""
    from harness.reproduce import plan

    _, jobs = plan("lukv_ruler_longbench", ["method.allocator.profile=table.npy", "model=reference"])
    with_profile = {j["label"] for j in jobs if "method.allocator.profile=table.npy" in j["overrides"]}
    assert with_profile == {"lukv"} and {j["label"] for j in jobs} > {"lukv", "snapkv", "full"}
    with pytest.raises(KvbenchError, match=r"^method.scorer.windw=3: no method of paper lukv_ruler_longbench"):
        plan("lukv_ruler_longbench", ["method.scorer.windw=3", "model=reference"])


# ---- the full cache once, several questions per context ------------------------------------------------------

def _sweep_rows():
    """A sweep as kvbench runs it: full at each of its ratios, snapkv scoring once for both ratios (its prefill
    and scores recorded at the first ratio only: prefill_s 0 at the second)."""
    from tests.test_figures import make_row

    rows = []
    for s in range(2):
        for r in (0.25, 0.5):
            first = r == 0.25
            rows.append(make_row("ruler/vt", "full", r, 1.0, sample_id=s, prefill_s=1.0 if first else 0.0,
                                 compress_s=0.0, decode_s=0.2, kv_bytes=2**20))
            rows.append(make_row("ruler/vt", "snapkv", r, 1.0 if r == 0.5 else float(s), sample_id=s,
                                 prefill_s=1.0 if first else 0.0, compress_s=0.3 if first else 0.02, decode_s=0.1,
                                 kv_bytes=int(r * 2**20)))
    return rows


def test_full_cache_once_in_summary_and_cost_but_every_ratio_in_summary_csv(tmp_path):
    from harness.report import write_report
    from tests.test_figures import write_runs

    out = tmp_path / "out"
    write_report(write_runs(tmp_path / "runs", _sweep_rows()), out)
    summary = (out / "summary.md").read_text()
    assert [line for line in summary.splitlines() if line.startswith("| full")] == ["| full | 1.0 | 100.0 | 100.0 |"]
    assert "| snapkv | 0.25 | 50.0 | 50.0 |" in summary and "| snapkv | 0.5 | 100.0 | 100.0 |" in summary
    table = summary.splitlines().index("| full | 1.0 | 100.0 | 100.0 |")
    assert summary.splitlines()[table - 2].startswith("| method | keep_ratio")  # full is the first row
    cost = (out / "cost.md").read_text()
    full = [line for line in cost.splitlines() if line.startswith("| m | full")]
    # the shared prefill charged; no peak_mem_bytes in these rows: its columns are empty
    assert full == ["| m | full | 1.0 | 1 | 0 | 0.2 | 1.2 | 1.00 | 1.00 | 1 | 1.00 | – | – |"]
    assert "time_per_question_s" not in cost  # no questions_per_context field: nothing about questions
    csv = pd.read_csv(out / "summary.csv")
    assert sorted(csv[csv.method == "full"].keep_ratio) == [0.25, 0.5]  # data: as run


def test_a_ratio_that_reused_the_prefill_is_charged_it():
    from harness.report import charge_shared_prefill, cost_table
    from harness.metrics import mark_failed

    df = mark_failed(pd.DataFrame(_sweep_rows()))
    charged = charge_shared_prefill(df)
    snap = charged[(charged.method == "snapkv") & (charged.keep_ratio == 0.5)]
    assert list(snap.prefill_s) == [1.0, 1.0] and list(snap.compress_s) == pytest.approx([0.32, 0.32])
    assert list(df.loc[snap.index, "prefill_s"]) == [0.0, 0.0]  # the rows themselves are left as run
    c = cost_table(df).set_index(["method", "keep_ratio"])
    assert c.loc[("snapkv", 0.5), "total_s"] == pytest.approx(1.42)
    assert c.loc[("snapkv", 0.25), "total_s"] == pytest.approx(1.4)
    assert c.loc[("snapkv", 0.5), "time_vs_full"] == pytest.approx(1.42 / 1.2)


def test_cost_compares_the_time_before_decoding_and_peak_memory_with_full():
    """prefill_vs_full: (prefill_s + compress_s) over full's, medians per cell (gemfilter 0.4 + 0.1 and 0.6 + 0.2 ->
    median 0.65 of full's 1.0 + 0.0 and 1.2 + 0.1 -> 1.15); peak_vs_full: peak_mem_bytes over full's (medians
    48 and 96 MiB); time_vs_full per question with decoding: 0.75 over 1.25."""
    from harness.metrics import full_once, mark_failed
    from harness.report import cost_markdown, cost_table
    from tests.test_figures import make_row

    mib = 2**20
    rows = [make_row("ruler/vt", "full", 1.0, 1.0, sample_id=0, prefill_s=1.0, compress_s=0.0, decode_s=0.1,
                     kv_bytes=100, peak_mem_bytes=90 * mib),
            make_row("ruler/vt", "full", 1.0, 1.0, sample_id=1, prefill_s=1.2, compress_s=0.1, decode_s=0.1,
                     kv_bytes=100, peak_mem_bytes=102 * mib),
            make_row("ruler/vt", "gemfilter", 0.1, 1.0, sample_id=0, prefill_s=0.4, compress_s=0.1, decode_s=0.1,
                     kv_bytes=10, peak_mem_bytes=40 * mib),
            make_row("ruler/vt", "gemfilter", 0.1, 1.0, sample_id=1, prefill_s=0.6, compress_s=0.2, decode_s=0.1,
                     kv_bytes=10, peak_mem_bytes=56 * mib)]
    c = cost_table(full_once(mark_failed(pd.DataFrame(rows)))).set_index(["method", "keep_ratio"])
    assert c.loc[("gemfilter", 0.1), "prefill_vs_full"] == pytest.approx(0.65 / 1.15)
    assert c.loc[("gemfilter", 0.1), "peak_vs_full"] == pytest.approx(48 / 96)
    assert c.loc[("gemfilter", 0.1), "peak_mib"] == pytest.approx(48) and c.loc[("full", 1.0), "prefill_vs_full"] == 1
    text = cost_markdown(c.reset_index(), questions=False)
    assert "| time_vs_full | prefill_vs_full | kv_mib | kv_vs_full | peak_mib | peak_vs_full |" in text
    line = [ln for ln in text.splitlines() if ln.startswith("| m | gemfilter")]
    assert line == ["| m | gemfilter | 0.1 | 0.5 | 0.15 | 0.1 | 0.75 | 0.60 | 0.57 | 9.54e-06 | 0.10 | 48 | 0.50 |"]


def _question_rows():
    """Contexts asked K questions (the lead's row fields context_id, question_index, questions_per_context):
    task A K=3 over two contexts, task B K=2 over one, at keep 0.5, and the full cache at 0.25 and 0.5.

    snapkv scores: A q0 (1, 1), q1 (1, 0), q2 (0, 0) -> 100, 50, 0; B q0 0, q1 1 -> 0, 100;
    mean over tasks: q0 (100 + 0) / 2 = 50, q1 (50 + 100) / 2 = 75, q2 0 (only A)."""
    from tests.test_figures import make_row

    rows = []
    scores = {("A", 0): [1, 1, 0], ("A", 1): [1, 0, 0], ("B", 0): [0, 1]}
    for (task, c), per_q in scores.items():
        k = len(per_q)
        for q, score in enumerate(per_q):
            common = dict(sample_id=f"{task}{c}/q{q}", context_id=f"{task}{c}", question_index=q,
                          questions_per_context=k, compress_s=0.2, kv_bytes=100)
            rows.append(make_row(f"niah/{task}", "snapkv", 0.5, float(score), prefill_s=1.0,
                                 decode_s=0.1 * (q + 1), **common))
            for r in (0.25, 0.5):
                rows.append(make_row(f"niah/{task}", "full", r, 1.0, prefill_s=1.0 if r == 0.25 else 0.0,
                                     decode_s=0.1, **{**common, "compress_s": 0.0}))
    return rows


def test_score_by_question_index_table(tmp_path):
    from harness.report import write_report
    from tests.test_figures import write_runs

    out = tmp_path / "out"
    write_report(write_runs(tmp_path / "runs", _question_rows()), out)
    summary = (out / "summary.md").read_text()
    section = summary[summary.index("## m: score (x100) by question index"):]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines[0] == "| method | keep_ratio | q0 | q1 | q2 |"
    assert lines[2:] == ["| full | 1.0 | 100.0 | 100.0 | 100.0 |", "| snapkv | 0.5 | 50.0 | 75.0 | 0.0 |"]


def test_time_per_question_shares_the_context_over_its_questions():
    """(prefill + compress) / K + decode per row, median per cell: snapkv rows (1.0 + 0.2) / 3 + 0.1 q, q = 1..3
    for A (0.5, 0.6, 0.7, twice) and (1.2) / 2 + 0.1 q for B (0.7, 0.8): median of 8 = 0.65; full
    (1.0 + 0) / K + 0.1: 0.4333 (A, 6 rows) and 0.6 (B, 2 rows) at each ratio -> median 0.4333."""
    from harness.metrics import full_once, mark_failed
    from harness.report import cost_markdown, cost_table

    df = mark_failed(pd.DataFrame(_question_rows()))
    c = cost_table(full_once(df)).set_index(["method", "keep_ratio"])
    assert c.loc[("snapkv", 0.5), "time_per_question_s"] == pytest.approx(0.65)
    assert c.loc[("full", 1.0), "time_per_question_s"] == pytest.approx(1 / 3 + 0.1)
    assert c.loc[("snapkv", 0.5), "time_vs_full"] == pytest.approx(0.65 / (1 / 3 + 0.1))
    assert list(c.index) == [("full", 1.0), ("snapkv", 0.5)]
    text = cost_markdown(cost_table(full_once(df)), questions=True)
    assert "| time_per_question_s |" in text and "| m | snapkv | 0.5 |" in text
