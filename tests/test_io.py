"""Durable rows: a torn last line is dropped (never parsed), resume skips written keys, writes are atomic."""
import json

import pytest

from harness.errors import KvbenchError
from harness.io import RowStore, atomic_write_json, read_rows


def row(i, ratio=0.5):
    return {"task": "t", "sample_id": str(i), "method": "m", "keep_ratio": ratio, "score": i / 10}


def test_torn_last_line_is_dropped_and_cut(tmp_path):
    p = tmp_path / "predictions.jsonl"
    good = "".join(json.dumps(row(i)) + "\n" for i in range(3))
    p.write_text(good + '{"task": "t", "sample_id": "3", "meth')
    rows, valid = read_rows(p)
    assert [r["sample_id"] for r in rows] == ["0", "1", "2"] and valid == len(good.encode())
    store = RowStore(p)
    assert p.read_text() == good  # the torn tail is cut before anything is appended
    store.append([row(3)])
    assert [r["sample_id"] for r in read_rows(p)[0]] == ["0", "1", "2", "3"]


def test_torn_line_that_happens_to_be_valid_json_is_still_dropped(tmp_path):
    # A kill can cut a line right after a closing brace of a nested value; without its newline it is not data.
    p = tmp_path / "predictions.jsonl"
    p.write_text(json.dumps(row(0)) + "\n" + json.dumps(row(1)))
    assert [r["sample_id"] for r in read_rows(p)[0]] == ["0"]


def test_malformed_middle_line_names_its_number(tmp_path):
    p = tmp_path / "predictions.jsonl"
    p.write_text(json.dumps(row(0)) + "\n{oops\n" + json.dumps(row(2)) + "\n")
    with pytest.raises(KvbenchError, match="line 2"):
        read_rows(p)


def test_resume_skips_written_keys(tmp_path):
    p = tmp_path / "predictions.jsonl"
    store = RowStore(p)
    store.append([row(0), row(1)])
    again = RowStore(p)
    assert ("t", "0", "m", 0.5) in again.done
    again.append([row(1), row(2), row(2, ratio=0.25)])
    ids = [(r["sample_id"], r["keep_ratio"]) for r in read_rows(p)[0]]
    assert ids == [("0", 0.5), ("1", 0.5), ("2", 0.5), ("2", 0.25)]


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "metrics.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"b": 2})
    assert json.loads(p.read_text()) == {"b": 2}
    assert [x.name for x in tmp_path.iterdir()] == ["metrics.json"]
