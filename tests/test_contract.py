"""The method contract is declared, not discovered: the harness calls the extension points of ``Part`` / ``Scorer`` /
``Allocator`` / ``Task`` directly (each has a default on its base class), never probes for them with ``getattr`` /
``hasattr``, and writes no private attribute onto model modules."""
from __future__ import annotations

import ast
from pathlib import Path

from harness.compress import Allocator, Part, Scorer
from tasks.base import Task

ROOT = Path(__file__).resolve().parent.parent
HARNESS = sorted((ROOT / "harness").rglob("*.py"))


def declared() -> set[str]:
    """Every public attribute the base classes declare (methods and class attributes)."""
    names = set()
    for cls in (Part, Scorer, Allocator, Task):
        names |= {n for n in vars(cls) if not n.startswith("_")}
    return names


def probes(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every ``getattr(x, "name", ...)`` / ``hasattr(x, "name")`` with a literal name."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            out.append((node.lineno, node.args[1].value))
    return out


def test_extension_points_have_defaults_on_the_base_classes():
    for name in ("bind_model", "input_files", "query_rows", "finish_prefill", "prefill_kept", "row_extras",
                 "prefill_patch", "decode_patch", "needs_hidden_states", "shares_across_ratios", "PRESETS"):
        assert name in vars(Scorer) or name in vars(Part), name
    assert "budgets" in vars(Allocator) and "skip_chat_template" in vars(Task)
    # A scorer written today with nothing but score() works with every hook's default.
    scorer = type("Bare", (Scorer,), {"score": lambda self, inputs: None})()
    assert scorer.input_files() == {} and scorer.query_rows(0) is None and scorer.prefill_kept() is None
    assert scorer.finish_prefill([None]) == [None] and scorer.row_extras() == {}


def test_no_harness_module_probes_for_an_extension_point():
    points = declared()
    found = [(p.relative_to(ROOT), line, name) for p in HARNESS for line, name in probes(p.read_text())
             if name in points or name.startswith("_kvbench")]
    assert found == []


def test_the_probe_finder_finds_a_probe():
    source = 'def f(scorer):\n    hook = getattr(scorer, "query_rows", None)\n    return hasattr(scorer, "_kvbench_x")\n'
    assert probes(source) == [(2, "query_rows"), (3, "_kvbench_x")]
    assert "query_rows" in declared()


def test_no_module_writes_a_private_attribute_onto_model_modules():
    for path in [*HARNESS, *sorted((ROOT / "methods").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                assert not node.attr.startswith("_kvbench"), f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}"


def test_a_new_scorer_with_alpha_and_window_gets_its_own_defaults():
    """Parameters do not leak between parts: a scorer's ``alpha`` / ``window`` are its own, AdaKV's alpha and
    window are AdaKV's, and a typo in a part's key is one line naming the part's keys."""
    import pytest

    import methods
    from harness.compress import SCORERS, register_scorer
    from harness.errors import KvbenchError

    @register_scorer("test_alpha_window")
    class AlphaWindowScorer(Scorer):
        def __init__(self, alpha: float = 1.0, window: int = 7):
            self.alpha, self.window = alpha, window

        def score(self, inputs):
            return None

    try:
        m = methods.build_method({"name": "snapkv", "scorer": {"name": "test_alpha_window"},
                                  "allocator": {"name": "adakv"}})
        assert (m.scorer.alpha, m.scorer.window) == (1.0, 7)
        assert (m.allocator.alpha, m.allocator.window) == (0.2, 0)
        m = methods.build_method({"name": "snapkv", "scorer": {"name": "test_alpha_window", "alpha": 3.0},
                                  "allocator": {"name": "adakv", "alpha": 0.5}})
        assert (m.scorer.alpha, m.allocator.alpha) == (3.0, 0.5)
        with pytest.raises(KvbenchError) as err:
            methods.build_method({"name": "snapkv", "scorer": {"name": "test_alpha_window", "alpah": 2.0}})
        line = str(err.value)
        assert "\n" not in line and "method.scorer.alpah" in line and "keys: alpha, window" in line
    finally:
        SCORERS.pop("test_alpha_window")
