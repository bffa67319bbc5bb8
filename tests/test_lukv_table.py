"""LU-KV's own budget table (.npy [99, layers, kv_heads] of per-head prune ratios, row i = compression
(i + 1) / 100, as kvpress's LUKVPress loads it) read as a ``method.profile``; small tables written here."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from harness.errors import KvbenchError


def lukv_table(n_layers: int = 2, n_heads: int = 2) -> np.ndarray:
    """A table whose heads differ: head h of layer l prunes cr * w[l, h], each layer's weights averaging 1, so
    that a row's layers keep the row's share (as LU-KV's solver makes them; rows clipped at 1 near cr 0.99).
    With T = 400 and cr in 0.25, 0.5, 0.75, 0.8, every head's ideal count is a whole number."""
    weights = [0.8, 1.2, 0.9, 1.1][:n_heads]
    w = np.array([np.roll(weights, layer) for layer in range(n_layers)], dtype=np.float64)
    w = w / w.mean(axis=1, keepdims=True)
    cr = (np.arange(1, 100, dtype=np.float64) / 100)[:, None, None]
    return np.clip(cr * w[None], 0.0, 1.0)


def kvpress_keep_counts(table: np.ndarray, compression_ratio: float, layer: int, seq_len: int) -> list[int]:
    """Keep counts per KV head of one layer, as kvpress's LUKVPress.compress computes them (kvpress
    kvpress/presses/lukv_press.py at 520d418): row round(100 * cr) - 1, keep = (1 - prune) * T, the layer's
    total rounded, floors + the largest fractional parts, each head in [1, T]."""
    idx = max(0, min(98, int(round(compression_ratio * 100)) - 1))
    keep_rates = np.clip(1.0 - table[idx, layer], 0.0, 1.0)
    ideal = keep_rates * seq_len
    n_heads = len(ideal)
    total = max(n_heads, min(n_heads * seq_len, int(round(ideal.sum()))))
    base = np.floor(ideal).astype(int)
    remainder = total - int(base.sum())
    if remainder > 0:
        base[np.argsort(-(ideal - base), kind="stable")[:min(remainder, n_heads)]] += 1
    return np.clip(base, 1, seq_len).tolist()


def test_table_loads_as_a_profile(tmp_path):
    from harness.profiles import LUKV_TABLE_FORMAT, load_profile

    table = lukv_table()
    np.save(tmp_path / "curve.npy", table)
    prof = load_profile(tmp_path / "curve.npy")
    assert prof.meta["format"] == LUKV_TABLE_FORMAT and prof.meta["scope"] == "global"
    assert (prof.n_layers, prof.n_kv_heads) == (2, 2) and prof.ratios.numel() == 99
    assert bool((prof.ratios[1:] > prof.ratios[:-1]).all())  # ascending keep ratios 0.01 .. 0.99
    for cr in (0.25, 0.5, 0.75, 0.8, 0.9):  # at a table row, the shares are that row's keep rates
        row = int(round(cr * 100)) - 1
        assert torch.allclose(prof.shares(1 - cr), torch.tensor(1.0 - table[row]), atol=1e-6)


def test_official_budgets_match_kvpress_counts(tmp_path):
    """Where the table's counts are whole numbers, the lukv allocator's budgets are kvpress's LUKVPress counts."""
    from harness.profiles import load_profile
    from methods.lukv import LUKVAllocator, lukv_budgets

    table = lukv_table(n_layers=3, n_heads=4)
    np.save(tmp_path / "curve.npy", table)
    prof = load_profile(tmp_path / "curve.npy")
    seq_len = 400
    for cr in (0.25, 0.5, 0.75, 0.8):
        got = lukv_budgets(prof, [seq_len] * 3, 4, 1 - cr)
        want = [kvpress_keep_counts(table, cr, layer, seq_len) for layer in range(3)]
        assert got.tolist() == want, cr
        assert int(got.sum()) == round(3 * 4 * seq_len * (1 - cr))
    alloc = LUKVAllocator(profile=str(tmp_path / "curve.npy"))
    scores = [torch.rand(1, 4, seq_len) for _ in range(3)]
    assert alloc.budgets(scores, 0.5).tolist() == [kvpress_keep_counts(table, 0.5, l, seq_len) for l in range(3)]


def test_table_for_another_model_is_refused(tmp_path):
    from methods.lukv import LUKVAllocator

    np.save(tmp_path / "curve.npy", lukv_table(n_layers=2, n_heads=2))
    alloc = LUKVAllocator(profile=str(tmp_path / "curve.npy"))
    with pytest.raises(KvbenchError, match="2 layers x 2 KV heads"):
        alloc.budgets([torch.rand(1, 8, 64) for _ in range(32)], 0.5)


@pytest.mark.parametrize("array, needle", [
    (np.zeros((98, 2, 2)), "has shape (98, 2, 2)"),
    (np.zeros((99, 4)), "has shape (99, 4)"),
    (np.full((99, 2, 2), 1.5), "outside [0, 1]"),
    (np.full((99, 2, 2), np.nan), "outside [0, 1]"),
    (np.array([[["a"] * 2] * 2] * 99), "not numbers"),
])
def test_bad_tables_are_refused(tmp_path, array, needle):
    from harness.profiles import load_profile

    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(KvbenchError) as err:
        load_profile(tmp_path / "bad.npy")
    assert needle in str(err.value) and "\n" not in str(err.value) and "bad.npy" in str(err.value)


def test_pickle_is_never_loaded(tmp_path):
    """An object array (needs pickle), a torch.save .pt and a raw pickle are refused without being unpickled."""
    from harness.profiles import load_profile

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    np.save(tmp_path / "objects.npy", np.array([Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(KvbenchError, match="needs pickle"):
        load_profile(tmp_path / "objects.npy")
    torch.save(torch.zeros(99, 2, 2), tmp_path / "table.pt")
    with pytest.raises(KvbenchError, match="pickle-based file .* weights_only=True"):
        load_profile(tmp_path / "table.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(KvbenchError, match="pickle-based file"):
        load_profile(tmp_path / "raw.pkl")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "objects.npy").read_bytes()[:12])
    with pytest.raises(KvbenchError, match="cut.npy"):
        load_profile(tmp_path / "cut.npy")
