"""Published numbers beside ours: ``published.md``, ``published.tex``, ``published.csv``.

A run made from a paper preset (``kvbench paper=<name>``, ``kvbench-reproduce <name>``) carries the preset's
``paper`` node in its ``config.yaml``: ``name``, ``sources`` (key -> citation: file, table or figure, commit or URL
and date), ``configs`` (key -> the exact configuration a number was measured with: press and parameters, query
mode, model, context length), ``grid``, ``published`` (a list of ``{model, method, keep_ratio, task, score, source,
config, approximate, note}``) and ``notes`` (claims that are not table cells).

Every published cell names its ``source`` (a key of ``sources``); a cell with a number also names its
configuration (``config``, a key of ``configs``; by default the key equal to the cell's method label) and says
whether the number is ``approximate`` (read from a plot: shown as "≈80.3"; default false). A preset breaking this
is refused when it loads (``check_published``, called by ``kvbench-reproduce``'s ``load_preset``) and when a report
reads a run made from it. Source, configuration and the approximate flag go into every table.

A published cell is matched to ours on (model, method, keep_ratio, task):

- ``task`` is a task name (``ruler/vt``) or a suite name (``ruler``, ``longbench``): a suite cell is our mean
  over that suite's tasks (the tasks named ``<suite>/...``); the ``tasks`` column says how many we averaged,
  so a partial mean is visible;
- ``method`` is the label our rows carry (``snapkv+adakv``), ``keep_ratio`` is the fraction kept
  (kvpress's compression_ratio is 1 - keep_ratio);
- ``model`` is the label our rows carry (``Llama-3.1-8B-Instruct`` for ``model.path=.../Llama-3.1-8B-Instruct``);
  ``null`` means the paper's model is not known and matches every model we ran. When the runs hold no rows of a
  paper's model but rows of a model the paper never used (a stand-in such as ``reference`` or ``tiny-random``,
  for a quick check), ours comes from the stand-in, named in the ``ours_model`` column;
- an optional ``context_length`` restricts ours to runs at that length;
- ``paper.task_aliases`` (``{ruler: [ruler_kvpress]}``) names other suites that measure the same cell: when our
  runs hold no row of the cell's task, the first alias that has rows gives ours (kvpress's own RULER samples,
  ``task=ruler_kvpress``, against the leaderboard's ``ruler`` cells).

``score: null`` marks a cell whose number is unknown: it is shown as "unknown", never filled in. Rows with
neither our number nor a published one carry no information and are left out. Scores are x100, like ours; delta
= ours - published. Failed samples never enter our numbers (``harness.report.score_table``).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.errors import KvbenchError
from harness.io import atomic_write_text
from harness.paths import yaml_position

COLUMNS = ["paper", "model", "ours_model", "method", "keep_ratio", "task", "tasks", "n", "ours", "published",
           "approximate", "delta", "source", "config", "note"]


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved config a run wrote into its dir ({} when there is none); an unreadable or corrupt one is a
    one-line KvbenchError naming it (safe_load: a planted file builds no objects)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise KvbenchError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise KvbenchError(f"{str(path)!r} is not valid YAML{yaml_position(err)}; fix it or remove the run dir from "
                           "the report") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise KvbenchError(f"{str(path)!r} holds a YAML {type(cfg).__name__}, not a run config")
    return cfg


def paper_nodes(df: pd.DataFrame) -> dict[str, dict]:
    """``{paper name: paper node}`` from the runs below the report dir (the newest config.yaml wins)."""
    nodes: dict[str, tuple[float, dict]] = {}
    for run_dir in sorted(df["run_dir"].unique()) if "run_dir" in df else []:
        node = read_run_config(run_dir).get("paper")
        if not isinstance(node, dict) or not node.get("name"):
            continue
        _check_paper(node, Path(run_dir) / "config.yaml")
        mtime = (Path(run_dir) / "config.yaml").stat().st_mtime
        name = str(node["name"])
        if name not in nodes or mtime >= nodes[name][0]:
            nodes[name] = (mtime, node)
    return {k: v for k, (_, v) in sorted(nodes.items())}


def _check_paper(node: dict, path: Path) -> None:
    """The parts of a paper node the tables index into: a hand-edited config.yaml that breaks them is a one-line
    error naming the file, not a traceback from deep inside pandas."""
    problems = [f"{key} is not a {kind.__name__}" for key, kind in
                (("sources", dict), ("grid", dict), ("published", list), ("notes", list))
                if node.get(key) is not None and not isinstance(node[key], kind)]
    if not problems:
        problems = [f"published[{i}] needs method, task and a numeric keep_ratio"
                    for i, cell in enumerate(node.get("published") or [])
                    if not isinstance(cell, dict) or any(k not in cell for k in ("method", "task", "keep_ratio"))
                    or _num(cell["keep_ratio"]) is None]
    if problems:
        raise KvbenchError(f"{str(path)!r}: paper.{problems[0]}; fix it or remove the run dir from the report")
    try:
        check_published(node, repr(str(path)))
    except KvbenchError as err:
        raise KvbenchError(f"{err}; fix it or remove the run dir from the report") from None


def cell_config(paper: dict, cell: dict) -> str:
    """The key of ``paper.configs`` a published cell's number was measured with ("" when none is known): the
    cell's own ``config``, else its method label when ``configs`` has that key."""
    configs = paper.get("configs") or {}
    if cell.get("config") is not None:
        return str(cell["config"])
    return str(cell["method"]) if str(cell.get("method")) in configs else ""


def check_published(paper: dict, where: str) -> None:
    """Refuse (one-line ``KvbenchError``) a paper node whose published cells are not traceable: a cell without a
    ``source`` or naming one that ``sources`` lacks; a cell with a number but no configuration (``config`` or
    a ``configs`` key equal to its method), or naming a configuration ``configs`` lacks; an ``approximate``
    that is not true/false. ``where`` names the file in the message."""
    sources = paper.get("sources") or {}
    configs = paper.get("configs") or {}
    for key, kind in (("sources", dict), ("configs", dict), ("published", list)):
        if paper.get(key) is not None and not isinstance(paper[key], kind):
            raise KvbenchError(f"{where}: paper.{key} is not a {kind.__name__}")
    for i, cell in enumerate(paper.get("published") or []):
        if not isinstance(cell, dict):
            raise KvbenchError(f"{where}: paper.published[{i}] is not a mapping")
        what = (f"paper.published[{i}] ({cell.get('method')} at keep_ratio {cell.get('keep_ratio')} on "
                f"{cell.get('task')}, model {cell.get('model')})")
        source = cell.get("source")
        if source is None or str(source).strip() == "":
            raise KvbenchError(f"{where}: {what} has no source; every published cell needs source: <a key of "
                               "paper.sources> (a file or table at a commit, a paper table, a URL and date)")
        if str(source) not in sources:
            raise KvbenchError(f"{where}: {what} names source {source!r}, which paper.sources lacks "
                               f"(has: {', '.join(map(str, sources)) or 'none'})")
        approx = cell.get("approximate", False)
        if not isinstance(approx, bool):
            raise KvbenchError(f"{where}: {what} has approximate: {approx!r}; give true (read from a plot) or false")
        if cell.get("config") is not None and str(cell["config"]) not in configs:
            raise KvbenchError(f"{where}: {what} names config {cell['config']!r}, which paper.configs lacks "
                               f"(has: {', '.join(map(str, configs)) or 'none'})")
        if _num(cell.get("score")) is not None and not cell_config(paper, cell):
            raise KvbenchError(f"{where}: {what} has a score but no configuration; add config: <a key of "
                               "paper.configs> (press and parameters, query mode, model, context length)")


def _num(x) -> float | None:
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _ours(df: pd.DataFrame, model: str, method: str, ratio: float, task: str,
          context_length=None, aliases: list[str] | tuple[str, ...] = ()) -> tuple[float | None, int, int]:
    """Our score x100 for one cell: (score, n samples, n tasks averaged). Failed rows excluded. ``aliases``:
    other task / suite names tried in order when ``task`` has no row."""
    rows = df[(df["model"] == model) & (df["method"] == method) & ((df["keep_ratio"] - ratio).abs() < 1e-6)
              & ~df["failed"]]
    if context_length is not None and "context_length" in rows:
        rows = rows[rows["context_length"] == int(context_length)]
    for name in (task, *aliases):
        if name in set(rows["task"]):
            sub = rows[rows["task"] == name]
        else:  # a suite: mean over its tasks of the per-task means
            sub = rows[rows["task"].str.startswith(name + "/")]
        if not sub.empty:
            break
    if sub.empty:
        return None, 0, 0
    per_task = sub.groupby("task")["score"].mean()
    return 100.0 * float(per_task.mean()), int(len(sub)), int(len(per_task))


def side_by_side(df: pd.DataFrame, paper: dict) -> pd.DataFrame:
    """One row per published cell (x our model it is matched to), columns ``COLUMNS``."""
    name = str(paper.get("name"))
    if "paper" in df:
        df = df[df["paper"] == name]
    grid_models = [m.get("label") for m in (paper.get("grid") or {}).get("models") or [] if isinstance(m, dict)]
    published = paper.get("published") or []
    paper_models = {str(p.get("model")) for p in published if p.get("model") is not None} | {
        str(m) for m in grid_models if m}
    ours_models = sorted(df["model"].dropna().unique()) if len(df) else []
    stand_ins = [m for m in ours_models if m not in paper_models]
    aliases = {str(k): [str(a) for a in (v or [])] for k, v in (paper.get("task_aliases") or {}).items()}
    rows = []
    for p in published:
        pmodel = p.get("model")
        if pmodel is None:
            targets = ours_models or [None]
        elif pmodel in ours_models:
            targets = [pmodel]
        else:
            targets = stand_ins or [None]
        ratio = float(p["keep_ratio"])
        score = _num(p.get("score"))
        for m in targets:
            ours, n, n_tasks = (_ours(df, m, str(p["method"]), ratio, str(p["task"]), p.get("context_length"),
                                      aliases.get(str(p["task"]), ())) if m is not None else (None, 0, 0))
            if ours is None and score is None:
                continue
            source_key = p.get("source")
            rows.append({
                "paper": name,
                "model": pmodel if pmodel is not None else "(not stated)",
                "ours_model": m if m is not None else "",
                "method": str(p["method"]),
                "keep_ratio": round(ratio, 6),
                "task": str(p["task"]),
                "tasks": n_tasks,
                "n": n,
                "ours": ours,
                "published": score,
                "approximate": bool(p.get("approximate", False)) and score is not None,
                "delta": ours - score if ours is not None and score is not None else None,
                "source": str(source_key) if source_key is not None else "",
                "config": cell_config(paper, p),
                "note": str(p.get("note") or ""),
            })
    out = pd.DataFrame(rows, columns=COLUMNS)
    return out.sort_values(["paper", "model", "task", "method", "keep_ratio", "ours_model"],
                           ascending=[True, True, True, True, False, True], kind="stable").reset_index(drop=True)


def _f(x, signed: bool = False) -> str:
    x = _num(x)
    if x is None:
        return ""
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _cells(r: pd.Series) -> dict[str, str]:
    published = _f(r["published"])
    return {
        "ours": _f(r["ours"]) or "–",
        "published": ("≈" + published if published and bool(r["approximate"]) else published) or "unknown",
        "delta": _f(r["delta"], signed=True) or "–",
        "keep_ratio": f"{float(r['keep_ratio']):g}",
        "tasks": str(int(r["tasks"])) if r["tasks"] else "–",
        "n": str(int(r["n"])) if r["n"] else "–",
    }


def _show_ours_model(t: pd.DataFrame) -> bool:
    return bool(((t["ours_model"] != t["model"]) & (t["ours_model"] != "")).any())


def to_markdown(table: pd.DataFrame, papers: dict[str, dict]) -> str:
    parts = ["# Published numbers beside ours",
             "Scores x100. delta = ours - published. \"unknown\": the cell's number is not known to us (never filled "
             "in); \"–\": not run; \"≈\": approximate (read from a plot, see the source). `tasks`: how many tasks "
             "our number averages (a suite cell is the mean over its tasks). `config`: the configuration the "
             "published number was measured with (listed below each table). Failed samples are excluded from ours."]
    for name, paper in papers.items():
        t = table[table["paper"] == name]
        title = paper.get("title")
        parts.append(f"## {name}" + (f": {title}" if title else ""))
        if t.empty:
            parts.append("No published cell matches a run below this dir.")
        else:
            stand = _show_ours_model(t)
            head = ["model"] + (["ours on"] if stand else []) + ["method", "keep_ratio", "task", "tasks", "n",
                                                                 "ours", "published", "delta", "source", "config"]
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for _, r in t.iterrows():
                c = _cells(r)
                cells = [r["model"]] + ([r["ours_model"] or "–"] if stand else []) + [
                    r["method"], c["keep_ratio"], r["task"], c["tasks"], c["n"], c["ours"], c["published"],
                    c["delta"], r["source"] + (f" ({r['note']})" if r["note"] else ""), r["config"] or "–"]
                lines.append("| " + " | ".join(str(x) for x in cells) + " |")
            if stand:
                lines.append("")
                lines.append("`ours on` differs from `model`: a stand-in model ran the grid (a quick check, not a "
                             "reproduction); its delta compares different models.")
            parts.append("\n".join(lines))
        parts.extend(_sources_and_notes_md(paper))
    return "\n\n".join(parts) + "\n"


def _sources_and_notes_md(paper: dict) -> list[str]:
    out = []
    sources = paper.get("sources") or {}
    if sources:
        out.append("Sources:\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in sources.items()))
    configs = paper.get("configs") or {}
    if configs:
        out.append("Configurations of the published numbers:\n\n" + "\n".join(
            f"- `{k}`: {v}" for k, v in configs.items()))
    notes = paper.get("notes") or []
    if notes:
        out.append("Claims that are not table cells (recorded, not compared):\n\n" + "\n".join(
            f"- {n.get('claim')} (source: `{n.get('source')}`)" for n in notes if isinstance(n, dict)))
    return out


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "≈": r"$\approx$"}


def tex_escape(text) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, papers: dict[str, dict]) -> str:
    """One booktabs table per paper (needs \\usepackage{booktabs}); sources and notes as a footnote block."""
    out = ["% kvbench: published numbers beside ours (scores x100, delta = ours - published).",
           "% Needs \\usepackage{booktabs}."]
    for name, paper in papers.items():
        t = table[table["paper"] == name]
        stand = _show_ours_model(t) if len(t) else False
        cols = ["Model"] + (["Ours on"] if stand else []) + ["Method", "Keep", "Task", "Ours", "Published",
                                                             r"$\Delta$", "Source", "Config"]
        # model, [ours on], method, keep, task, numbers, source, config
        align = "l" * (2 if stand else 1) + "lrl" + "rrr" + "ll"
        out += ["", r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
                " & ".join(cols) + r" \\", r"\midrule"]
        for _, r in t.iterrows():
            c = _cells(r)
            cells = [r["model"]] + ([r["ours_model"] or "--"] if stand else []) + [
                r["method"], c["keep_ratio"], r["task"], c["ours"], c["published"], c["delta"],
                r["source"] + (f" ({r['note']})" if r["note"] else ""), r["config"] or "--"]
            out.append(" & ".join(tex_escape(x) for x in cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
        caption = f"{name}: ours beside published numbers (x100; ≈ approximate, read from a plot)."
        if paper.get("title"):
            caption = (f"{name} ({paper['title']}): ours beside published numbers (x100; ≈ approximate, read from "
                       "a plot).")
        out.append(rf"\caption{{{tex_escape(caption)}}}")
        out.append(rf"\label{{tab:paper-{tex_escape(name).replace(chr(92), '')}}}")
        out.append(r"\end{table}")
        for k, v in (paper.get("sources") or {}).items():
            out.append(f"% source {k}: {v}")
        for k, v in (paper.get("configs") or {}).items():
            out.append(f"% config {k}: {v}")
        for n in paper.get("notes") or []:
            if isinstance(n, dict):
                out.append(f"% claim (not a table cell): {n.get('claim')} [{n.get('source')}]")
    return "\n".join(out) + "\n"


def to_csv(table: pd.DataFrame, papers: dict[str, dict]) -> str:
    """Long CSV: COLUMNS + source_text and config_text (the full citation of the source key, the full
    configuration of the config key)."""
    t = table.copy()
    t["source_text"] = [str((papers.get(p, {}).get("sources") or {}).get(s, "")) for p, s in
                        zip(t["paper"], t["source"])]
    t["config_text"] = [str((papers.get(p, {}).get("configs") or {}).get(c, "")) if c else "" for p, c in
                        zip(t["paper"], t["config"])]
    t["approximate"] = t["approximate"].map(lambda x: "true" if bool(x) else "false")
    for col in ("ours", "published", "delta"):
        t[col] = t[col].map(lambda x: "" if _num(x) is None else f"{float(x):.4f}")
    t["keep_ratio"] = t["keep_ratio"].map(lambda x: f"{float(x):g}")
    return t.to_csv(index=False, lineterminator="\n")


def write_published(df: pd.DataFrame, out: Path) -> list[Path]:
    """published.{md,tex,csv} in ``out`` when the runs carry a paper node; [] otherwise."""
    papers = paper_nodes(df)
    if not papers:
        return []
    table = pd.concat([side_by_side(df, p) for p in papers.values()], ignore_index=True) if papers else None
    if table is None or table.empty:
        table = pd.DataFrame(columns=COLUMNS)
    paths = []
    for suffix, text in (("md", to_markdown(table, papers)), ("tex", to_latex(table, papers)),
                         ("csv", to_csv(table, papers))):
        p = Path(out) / f"published.{suffix}"
        atomic_write_text(p, text)
        paths.append(p)
    return paths
