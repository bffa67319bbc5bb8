"""The report of runs that compressed while decoding (issue #26), from synthetic rows in the runner's shape: the
method key that keeps a decode-time run apart from the prefill-only run, the piecewise footprint and its means
(hand-computed), the decode speed and footprint tables, the two footprint figures, and rows without the new fields
reported exactly as before."""
from __future__ import annotations

import pandas as pd
import pytest

from harness.figures import FULL_LABEL
from tests.test_figures import close_all, legend_labels, make_row, visible_axes, write_runs  # noqa: F401 (fixture)

ENTRY_BYTES = 1000  # bytes of one entry per head over every layer and head of the synthetic model


def footprint(start: int, generated: int, target: int | None = None, interval: int | None = None) -> list[dict]:
    """The runner's kv_footprint: ``start`` entries after the prefill, one more per token, cut back to ``target``
    every ``interval`` tokens (a point before and one after each cut), and the end."""
    points, entries = [], start

    def point(g, e):
        points.append({"generated": g, "entries_mean": float(e), "entries_max": e + 2, "bytes": e * ENTRY_BYTES})

    point(0, entries)
    for g in range(1, generated + 1):
        entries += 1
        if interval and g % interval == 0 and g < generated:
            point(g, entries)
            entries = target
            point(g, entries)
    point(generated, entries)
    return points


def decoding_fields(mode: str, start: int, generated: int, target=None, interval=None, decode_s=1.0) -> dict:
    points = footprint(start, generated, target, interval)
    from harness.footprint_figures import footprint_mean

    return {"prefill_s": 0.5, "compress_s": 0.1, "kv_bytes": start * ENTRY_BYTES, "decoding": mode,
            "decoding_target_size": target, "decoding_interval": interval, "kv_footprint": points,
            "generated_tokens": generated, "decode_s": decode_s, "decode_ms_per_token": decode_s * 1000 / generated,
            "kv_mean_entries": footprint_mean(points), "kv_mean_bytes": footprint_mean(points, "bytes")}


# ---------------------------------------------------------------------------------------------- method key
def test_method_key_names_the_decoding_mode_target_and_interval():
    from harness.report import method_key

    assert method_key({"method": "snapkv"}) == "snapkv"  # rows before issue #26
    assert method_key({"method": "snapkv", "decoding": "prefill", "decoding_target_size": 256}) == "snapkv"
    assert method_key({"method": "snapkv", "decoding": "both", "decoding_target_size": 256,
                       "decoding_interval": 64}) == "snapkv [both 256/64]"
    assert method_key({"method": "knorm", "decoding": "decode", "decoding_target_size": None,
                       "decoding_interval": 128}) == "knorm [decode ratio/128]"
    assert method_key(pd.Series({"method": "knorm", "decoding": "decode", "decoding_target_size": float("nan"),
                                 "decoding_interval": 32.0})) == "knorm [decode ratio/32]"
    assert method_key({"method": "full", "decoding": "decode", "decoding_target_size": 256,
                       "decoding_interval": 64}) == "full"  # evicts nothing: one reference


@pytest.mark.parametrize("field, value, named", [
    ("decoding", "sometimes", "decoding 'sometimes', not one of prefill, decode, both"),
    ("decoding_interval", 0, "decoding_interval 0, not a positive integer or null"),
    ("kv_footprint", [{"generated": 5, "entries_mean": 1.0}, {"generated": 3, "entries_mean": 1.0}],
     "point 1 has generated 3 after 5"),
    ("kv_footprint", [{"generated": 0, "entries_mean": "many"}], "point 0 has entries_mean 'many'"),
    ("decode_ms_per_token", "fast", "has decode_ms_per_token 'fast', not a number"),
])
def test_a_bad_decoding_field_is_refused_in_one_line(tmp_path, capsys, monkeypatch, field, value, named):
    from harness import cli

    rows = [make_row("ruler/vt", "snapkv", 0.5, 1.0, **{field: value})]
    monkeypatch.setattr("sys.argv", ["kvbench-report", str(write_runs(tmp_path / "runs", rows))])
    with pytest.raises(SystemExit) as exit_info:
        cli.report_main()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("kvbench-report: error: ")
    assert named in lines[0] and "ruler/vt sample 0" in lines[0] and "fix or remove that line" in lines[0]
    assert not (tmp_path / "runs" / "summary.md").exists()  # refused before anything is written


# ---------------------------------------------------------------------------------------------- the footprint
HAND = [{"generated": 0, "entries_mean": 100.0}, {"generated": 64, "entries_mean": 164.0},
        {"generated": 64, "entries_mean": 100.0}, {"generated": 100, "entries_mean": 136.0}]


def test_footprint_mean_is_the_area_of_the_sawtooth_over_the_tokens_generated():
    """0-64: 100 -> 164, mean 132 over 64 tokens; cut to 100; 64-100: 100 -> 136, mean 118 over 36:
    (64 * 132 + 36 * 118) / 100 = (8448 + 4248) / 100 = 126.96."""
    from harness.footprint_figures import footprint_mean

    assert footprint_mean(HAND) == pytest.approx(126.96)
    assert footprint_mean(HAND[:1]) == 100.0  # nothing generated: the cache as left by the prefill
    assert footprint_mean([HAND[0], {"generated": 10, "entries_mean": 110.0}]) == 105.0  # a growing cache
    assert footprint_mean(footprint(100, 100, target=100, interval=64)) == pytest.approx(126.96)  # the runner's


def test_mean_curve_keeps_the_drops_and_averages_the_samples_still_generating():
    """Sample A = HAND; sample B grows 100 -> 150 and stops at 50 tokens. At 0: 100; at 50: (150 + 150) / 2
    from the left, A alone (150) after B stops; at 64: 164 before A's cut, 100 after; at 100: 136."""
    from harness.footprint_figures import mean_curve

    b = [{"generated": 0, "entries_mean": 100.0}, {"generated": 50, "entries_mean": 150.0}]
    xs, ys = mean_curve([HAND, b])
    assert list(zip(xs, ys)) == [(0, 100.0), (50, 150.0), (64, 164.0), (64, 100.0), (100, 136.0)]
    xs, ys = mean_curve([HAND, [{**p, "entries_mean": p["entries_mean"] + 10} for p in HAND]])
    assert list(zip(xs, ys)) == [(0, 105.0), (64, 169.0), (64, 105.0), (100, 141.0)]


# ---------------------------------------------------------------------------------------------- a sweep
def decode_sweep() -> list[dict]:
    """Two samples of ruler/vt at 1000 tokens generating 100 and 80 tokens: full (a growing cache from 1000),
    snapkv after prefill at keep 0.25 (from 250), snapkv both (250, cut to 100 every 64) and knorm decode (1000,
    cut to 200 every 32). decode_s per row: full 1.0 / 0.8 s (10 ms a token), the others as set below."""
    rows = []
    for s, generated in ((0, 100), (1, 80)):
        score = 1.0 - 0.5 * s
        rows.append(make_row("ruler/vt", "full", 0.25, 1.0, sample_id=s, length=1000,
                             **decoding_fields("prefill", 1000, generated, decode_s=generated / 100)))
        rows.append(make_row("ruler/vt", "snapkv", 0.25, score, sample_id=s, length=1000, run_dir="prefill",
                             **decoding_fields("prefill", 250, generated, decode_s=generated / 200)))
        rows.append(make_row("ruler/vt", "snapkv", 0.25, score / 2, sample_id=s, length=1000, run_dir="both",
                             **decoding_fields("both", 250, generated, 100, 64, decode_s=generated / 400)))
        rows.append(make_row("ruler/vt", "knorm", 0.25, 0.0, sample_id=s, length=1000, run_dir="decode",
                             **decoding_fields("decode", 1000, generated, 200, 32, decode_s=generated / 250)))
    return rows


@pytest.fixture(scope="module")
def decode_report(tmp_path_factory):
    from harness.report import write_report

    root = tmp_path_factory.mktemp("decode")
    out = root / "out"
    return out, write_report(write_runs(root / "runs", decode_sweep()), out)


KEYS = ["full", "knorm [decode 200/32]", "snapkv", "snapkv [both 100/64]"]


def table_lines(text: str, heading: str) -> list[str]:
    """The lines of the first table below ``heading``."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_each_decoding_is_its_own_line_in_the_scores(decode_report):
    out, _ = decode_report
    lines = table_lines((out / "summary.md").read_text(), "## m: score (x100)")
    assert lines[2:] == ["| full | 1.0 | 100.0 | 100.0 |", "| knorm [decode 200/32] | 0.25 | 0.0 | 0.0 |",
                         "| snapkv | 0.25 | 75.0 | 75.0 |", "| snapkv [both 100/64] | 0.25 | 37.5 | 37.5 |"]


def test_footprint_table_means_and_max(decode_report):
    """snapkv both, sample 0 (100 tokens): 250 -> 314, cut to 100, 100 -> 136: (64 * 282 + 36 * 118) / 100 =
    222.96; sample 1 (80 tokens): (64 * 282 + 16 * 108) / 80 = 247.2; mean 235.08; max: 314 + 2 (entries_max).
    full: 1000 + generated / 2: 1050 and 1040 -> 1045, max 1102. knorm decode (1000, cut to 200 every 32),
    sample 0: 32 * 1016 + 32 * 216 + 32 * 216 + 4 * 202 = 47144 / 100 = 471.44; sample 1: 32 * 1016 + 32 * 216
    + 16 * 208 = 42752 / 80 = 534.4; mean 502.92, max 1032 + 2."""
    out, _ = decode_report
    lines = table_lines((out / "summary.md").read_text(), "## m: KV cache while decoding")
    assert lines[0] == "| method | keep_ratio | n | generated | mean_entries | max_entries | mean_mib |"
    mib = lambda entries: f"{entries * ENTRY_BYTES / 2**20:.3g}"  # noqa: E731
    assert lines[2:] == [f"| full | 1.0 | 2 | 90 | 1045.0 | 1102 | {mib(1045)} |",
                         f"| knorm [decode 200/32] | 0.25 | 2 | 90 | 502.9 | 1034 | {mib(502.92)} |",
                         f"| snapkv | 0.25 | 2 | 90 | 295.0 | 352 | {mib(295)} |",
                         f"| snapkv [both 100/64] | 0.25 | 2 | 90 | 235.1 | 316 | {mib(235.08)} |"]


def test_decode_ms_per_token_and_against_the_full_cache(decode_report):
    """ms per token: full 10 (both samples), snapkv 5, snapkv both 2.5, knorm decode 4; vs full: 0.5, 0.25, 0.4."""
    from harness.metrics import full_once
    from harness.report import cost_table, load_rows

    out, _ = decode_report
    c = cost_table(full_once(load_rows(out.parent / "runs"))).set_index(["method", "keep_ratio"])
    assert list(c.loc[[("full", 1.0), ("snapkv", 0.25), ("snapkv [both 100/64]", 0.25),
                       ("knorm [decode 200/32]", 0.25)], "decode_ms_per_token"]) == pytest.approx([10, 5, 2.5, 4])
    assert list(c.loc[[("full", 1.0), ("snapkv", 0.25), ("snapkv [both 100/64]", 0.25)], "decode_vs_full"]) \
        == pytest.approx([1, 0.5, 0.25])
    cost = (out / "cost.md").read_text()
    head = [ln for ln in cost.splitlines() if ln.startswith("| model")][0]
    assert "| decode_s | decode_ms_per_token | total_s |" in head and "| prefill_vs_full | decode_vs_full |" in head
    line = [ln for ln in cost.splitlines() if ln.startswith("| m | snapkv [both")][0]
    assert "| 0.225 | 2.5 |" in line and "| 0.25 |" in line  # decode_s median of 0.25 and 0.2, then ms/token


def test_decode_vs_full_compares_the_same_task_and_length():
    """snapkv ran a 1000-token task (full 10 ms/token, snapkv 5) and a 4000-token one (full 40, snapkv 10):
    cells 0.5 and 0.25, median 0.375; a pooled median would read 7.5 / 25 = 0.3."""
    from harness.metrics import full_once, mark_failed
    from harness.report import cost_table

    rows = [make_row(t, m, 0.5, 1.0, sample_id=0, length=n, decode_s=ms / 10, generated_tokens=100, kv_bytes=1)
            for t, n, full_ms, snap_ms in (("ruler/vt", 1000, 10, 5), ("ruler/cwe", 4000, 40, 10))
            for m, ms in (("full", full_ms), ("snapkv", snap_ms))]
    rows.append(make_row("ruler/fwe", "full", 0.5, 1.0, length=1000, decode_s=3.0, generated_tokens=100, kv_bytes=1))
    c = cost_table(full_once(mark_failed(pd.DataFrame(rows)))).set_index("method")
    assert c.loc["snapkv", "decode_vs_full"] == pytest.approx(0.375)  # fwe: full alone, no cell of snapkv's
    assert c.loc["snapkv", "decode_ms_per_token"] == pytest.approx(7.5)  # decode_s / generated_tokens


def test_footprint_figures_are_written_and_readable(decode_report):
    out, paths = decode_report
    for stem in ("kv_footprint_ruler_other", "score_vs_footprint_ruler_other"):
        for ext in ("png", "pdf"):
            p = out / f"{stem}.{ext}"
            assert p in paths and p.stat().st_size > 10_000


def test_footprint_curves_draw_the_sawtooth_and_full_once(decode_report, close_all):
    from harness.footprint_figures import draw_footprint_curves, footprint_rows
    from harness.metrics import full_once
    from harness.report import load_rows

    out, _ = decode_report
    ((stem, fig),) = draw_footprint_curves(footprint_rows(full_once(load_rows(out.parent / "runs"))))
    assert stem == "kv_footprint_ruler_other"
    (ax,) = visible_axes(fig)
    assert legend_labels(fig) == [FULL_LABEL, *KEYS[1:]]  # one keep ratio: not in the labels
    lines = {line.get_label(): line for line in ax.get_lines()}
    both = lines["snapkv [both 100/64]"]
    # mean of the samples: 250 -> 314, cut to 100 at 64, up to 116 at 80 (sample 1 stops), then sample 0 alone
    assert list(zip(both.get_xdata(), both.get_ydata())) == [(0, 250), (64, 314), (64, 100), (80, 116), (100, 136)]
    assert list(lines[FULL_LABEL].get_ydata()) == [1000, 1080, 1100] and lines[FULL_LABEL].get_linestyle() == "--"
    assert ax.get_xlabel() == "tokens generated" and "KV entries per head" in ax.get_ylabel()


def test_score_vs_footprint_is_a_point_per_method_and_ratio(decode_report, close_all):
    from harness.footprint_figures import draw_score_vs_footprint, footprint_rows
    from harness.metrics import full_once
    from harness.report import load_rows

    out, _ = decode_report
    ((_, fig),) = draw_score_vs_footprint(footprint_rows(full_once(load_rows(out.parent / "runs"))))
    (ax,) = visible_axes(fig)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert (list(lines["snapkv [both 100/64]"].get_xdata()), list(lines["snapkv [both 100/64]"].get_ydata())) \
        == (pytest.approx([235.08]), [37.5])
    assert set(lines[FULL_LABEL].get_ydata()) == {100.0}
    star = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert len(star) == 1 and list(star[0].get_xdata()) == [1045.0]  # the full cache at its own footprint
    assert legend_labels(fig) == [FULL_LABEL, *KEYS[1:]] and "mean KV entries per head" in ax.get_xlabel()


def test_several_keep_ratios_are_named_in_the_curve_labels(tmp_path, close_all):
    from harness.footprint_figures import draw_footprint_curves, footprint_rows
    from harness.report import load_rows

    rows = [make_row("ruler/vt", "snapkv", r, 1.0, length=1000,
                     **decoding_fields("both", int(r * 1000), 50, 100, 16)) for r in (0.25, 0.5)]
    ((_, fig),) = draw_footprint_curves(footprint_rows(load_rows(write_runs(tmp_path, rows))))
    assert legend_labels(fig) == ["snapkv [both 100/16] @ 0.25", "snapkv [both 100/16] @ 0.5"]


# ---------------------------------------------------------------------------------------------- old rows
def test_rows_without_the_new_fields_report_as_before(tmp_path):
    """The same sweep with and without ``decoding: prefill`` (and no footprint): the same tables, no footprint
    section, figure or cost column."""
    from harness.report import write_report

    old = [make_row("ruler/vt", m, r, 1.0 if m == "full" else r, sample_id=s, decode_s=0.1, prefill_s=1.0,
                    compress_s=0.0, kv_bytes=100) for m in ("full", "snapkv") for r in (0.25, 0.5) for s in (0, 1)]
    marked = [{**r, "decoding": "prefill", "decoding_target_size": None, "decoding_interval": None} for r in old]
    got = {}
    for name, rows in (("old", old), ("marked", marked)):
        paths = write_report(write_runs(tmp_path / name / "runs", rows), tmp_path / name / "out")
        got[name] = {p.name: p.read_text() for p in paths if p.suffix in (".md", ".csv")}
        assert not any("footprint" in p.name for p in paths)
    assert got["old"] == got["marked"]
    assert "KV cache while decoding" not in got["old"]["summary.md"] and "decode_ms" not in got["old"]["cost.md"]


def test_growing_caches_alone_draw_no_footprint(tmp_path):
    """Prefill-only runs carry kv_footprint (a growing cache) but no run compressed while decoding: no footprint
    figure or table (they would repeat the keep ratio); the decode speed columns stay."""
    from harness.report import write_report

    rows = [r for r in decode_sweep() if r["decoding"] == "prefill"]
    paths = write_report(write_runs(tmp_path / "runs", rows), tmp_path / "out")
    assert not any("footprint" in p.name for p in paths)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "KV cache while decoding" not in summary and "decode_ms_per_token" in (tmp_path / "out" / "cost.md").read_text()
