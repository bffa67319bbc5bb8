"""Imports point down only (the layers of harness/__init__.py): the core imports no method, task or command
module; methods/ and tasks/ import no command module. Every import counts, those inside functions too."""
import ast
from pathlib import Path

import pytest

import harness

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "methods", "tasks")


def layer(module: str) -> str:
    """``core``, ``command`` (harness.COMMAND_MODULES and their submodules), ``methods`` or ``tasks``."""
    top = module.split(".")[0]
    if top in ("methods", "tasks"):
        return top
    if any(module == c or module.startswith(c + ".") for c in harness.COMMAND_MODULES):
        return "command"
    return "core"


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[int, list[str]]]:
    """Per import statement of ``source`` (the code of ``module``): its line and what it may import, relative
    imports resolved. ``from pkg import a, b`` may import ``pkg``, ``pkg.a`` and ``pkg.b`` (names of a package
    can be modules)."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            out.append((node.lineno, [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]))
    return out


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that point up: a core module importing methods, tasks or a command module; a
    method or task module importing a command module."""
    own = layer(module)

    def up(target: str) -> bool:
        if target.split(".")[0] not in PACKAGES:
            return False
        theirs = layer(target)
        return (own == "core" and theirs != "core") or (own in ("methods", "tasks") and theirs == "command")

    bad = []
    for line, targets in imports(module, source, is_package):
        named = targets[:1] if up(targets[0]) else [t for t in targets[1:] if up(t)]
        bad += [f"{module}:{line} ({own}) imports {t} ({layer(t)})" for t in named]
    return bad


def scan(root: Path) -> tuple[list[str], list[str]]:
    """(modules read, violations) of the packages under ``root``."""
    modules, bad = [], []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if is_package else parts)
            modules.append(module)
            bad += violations(module, path.read_text(encoding="utf-8"), is_package)
    return modules, bad


def test_every_import_points_down():
    modules, bad = scan(ROOT)
    assert {m.split(".")[0] for m in modules} == set(PACKAGES) and len(modules) > 40
    assert bad == []


def test_command_modules_exist_and_the_core_is_what_is_left():
    modules, _ = scan(ROOT)
    for command in harness.COMMAND_MODULES:
        assert command in modules, f"harness.COMMAND_MODULES names {command}, which does not exist"
    core = {m for m in modules if layer(m) == "core"}
    # the method contract is core: every method may import it
    assert {"harness.compress", "harness.learning", "harness.attention", "harness.cache", "harness.pipeline",
            "harness.models", "harness.profiles", "harness.schema"} <= core
    assert not {"harness.train", "harness.profile", "harness.runner", "harness.reference.train"} & core


@pytest.mark.parametrize("module, source, wanted", [
    ("harness.pipeline", "import methods.snapkv\n", "methods.snapkv (methods)"),
    ("harness.pipeline", "def decode():\n    from methods import lkv\n", "methods (methods)"),  # in a function
    ("harness.compress", "from tasks.base import Task\n", "tasks.base (tasks)"),
    ("harness.compress", "from . import runner\n", "harness.runner (command)"),  # relative
    ("harness.models", "from harness import errors, train\n", "harness.train (command)"),
    ("harness.attention", "from harness.reference.model import TINY_ARCH\n", "harness.reference.model (command)"),
    ("methods.lukv", "from harness.profile import load_profile\n", "harness.profile (command)"),
    ("methods.spkv", "import harness.train\n", "harness.train (command)"),
    ("tasks.ruler.common", "from harness.runner import task_params\n", "harness.runner (command)"),
])
def test_the_check_refuses_an_import_that_points_up(module, source, wanted):
    (found,) = violations(module, source)
    assert found.endswith(f"imports {wanted}")


@pytest.mark.parametrize("module, source", [
    ("harness.pipeline", "from harness.attention import Hooks\nimport torch\n"),
    ("methods.lukv", "from harness.profiles import load_profile\nfrom harness.compress import round_to_total\n"),
    ("methods.spkv", "from methods._learned import load_checkpoint\n"),
    ("harness.train", "import methods\nfrom harness.learning import LEARNERS\n"),  # commands may import anything
    ("tasks.ruler.qa", "from .common import load_essays\nfrom harness.paths import read_text\n"),
])
def test_the_check_accepts_imports_that_point_down(module, source):
    assert violations(module, source) == []


def test_the_check_fails_on_a_tree_whose_core_imports_a_method(tmp_path):
    """The whole check (files found, named and read) on a tree where a core module imports a method."""
    for rel, text in {"harness/__init__.py": "", "harness/compress.py": '"""The protocol."""\nimport torch\n',
                      "harness/pipeline.py": "import torch\n\n\ndef decode():\n    from methods.lkv import share_out\n",
                      "methods/__init__.py": "", "methods/lkv.py": "from harness.compress import Scorer\n",
                      "tasks/__init__.py": "from tasks.base import Task\n", "tasks/base.py": ""}.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules, bad = scan(tmp_path)
    assert sorted(modules) == ["harness", "harness.compress", "harness.pipeline", "methods", "methods.lkv", "tasks",
                               "tasks.base"]
    assert bad == ["harness.pipeline:5 (core) imports methods.lkv (methods)"]
