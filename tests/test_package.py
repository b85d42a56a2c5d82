"""Package structure: the core never imports Lightning, optional libraries load lazily, and the doctests pass."""

from __future__ import annotations

import ast
import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_peft

PACKAGE = Path(lightning_peft.__file__).parent
# the only modules allowed to import Lightning (paths inside the package)
GLUE = {"callbacks.py", "mixin.py", "glue/checkpoints.py", "glue/prepare.py", "glue/reload.py", "glue/strategies.py"}
LIGHTNING = {"lightning", "pytorch_lightning"}
LAZY = {"transformers", "timm", "torchvision"}  # imported inside the code that needs them, never at import time
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def _import_time_nodes(tree: ast.Module) -> list[ast.AST]:
    """Statements that run when the module is imported: everything outside function bodies."""
    found: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)  # the body only runs under type checkers
            continue
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


@pytest.mark.parametrize("path", [p for p in SOURCES if _relative(p) not in GLUE], ids=_relative)
def test_core_module_never_imports_lightning(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    found = [(node.lineno, name) for node in ast.walk(tree) for name in _imported(node) if name in LIGHTNING]
    assert found == [], f"{_relative(path)} imports Lightning at lines {found}; only {sorted(GLUE)} may."


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_optional_libraries_are_not_imported_at_module_level(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    found = [(node.lineno, name) for node in _import_time_nodes(tree) for name in _imported(node) if name in LAZY]
    assert found == [], f"{_relative(path)} imports {found} at import time; import them inside the code that needs them."


def test_every_upstream_class_looked_up_by_name_may_be_gone_without_breaking_inject(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Classes of transformers/timm/torchvision are looked up by name (``imported_class``), never imported, so a
    release that removes one (transformers 5.25 dropped FalconFlashAttention2) cannot break import or inject."""
    import torch
    from torch import nn

    from lightning_peft import LoRA, PrefixTuning, PromptTuning, inject

    looked_up = [m for name, m in sys.modules.items() if name.startswith("lightning_peft") and
                 getattr(m, "imported_class", None) is not None]
    assert len(looked_up) >= 5  # the modules that name upstream classes
    for module in looked_up:
        monkeypatch.setattr(module, "imported_class", lambda module_name, class_name: None)  # every class gone

    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    text = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 2))
    image = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    image(torch.randn(1, 3, 8, 8))
    inject(text, LoRA(r=2, target_modules=["linear1"]), PrefixTuning(num_tokens=2))
    inject(image, LoRA(r=2, target_modules="all-conv"), PromptTuning(kind="pixels", width=1, image_size=[8, 8]))
    assert text(torch.randn(2, 5, 16)).shape == (2, 5, 2) and image(torch.randn(2, 3, 8, 8)).shape == (2, 2)


def test_import_lightning_peft_loads_no_optional_library_and_no_lightning() -> None:
    code = f"import sys, lightning_peft; print(sorted(m for m in {sorted(LAZY | LIGHTNING)!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(tree: ast.Module, modules: set[str]) -> set[str]:
    """The package's modules ``tree`` imports anywhere (function bodies too), except under ``if TYPE_CHECKING:``.

    ``from a.b import c`` names the module ``a.b.c`` if there is one, else ``a.b``; the packages above an imported
    module are not counted (a package's ``__init__`` importing its own submodules makes no circle)."""
    found: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
        todo.extend(ast.iter_child_nodes(node))
    return found & modules


def _import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module: sets of modules that import each other."""
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for name in graph[todo.pop()] - seen:
                seen.add(name)
                todo.append(name)
        reach[start] = seen
    circles = {frozenset({a} | {b for b in graph if b in reach[a] and a in reach[b]}) for a in graph if a in reach[a]}
    return sorted(sorted(circle) for circle in circles)


def test_import_circle_finder_finds_a_circle_through_a_function_body_and_none_under_type_checking() -> None:
    modules = {"p.a", "p.b", "p.c"}
    sources = {"p.a": "from p.b import x", "p.b": "def f():\n    import p.a", "p.c": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\nelse:\n    import p.b")}
    graph = {name: _imports_of(ast.parse(code), modules) - {name} for name, code in sources.items()}
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.b"}}
    assert _import_circles(graph) == [["p.a", "p.b"]]


def _package_imports() -> dict[str, set[str]]:
    """Module of lightning_peft → the package's modules it imports (see :func:`_imports_of`)."""
    modules = {_module_name(path): path for path in SOURCES}
    return {name: _imports_of(ast.parse(path.read_text(), str(path)), set(modules)) - {name}
            for name, path in modules.items()}


def test_no_import_circles_in_the_package() -> None:
    circles = _import_circles(_package_imports())
    assert circles == [], f"modules of lightning_peft import each other (also inside functions): {circles}"


def test_docstring_examples_run() -> None:
    finder = doctest.DocTestFinder()
    attempted, failed = 0, []
    for path in SOURCES:
        module = importlib.import_module(_module_name(path))
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        for test in finder.find(module, module.__name__):
            runner.run(test, out=lambda text: None)
        results = runner.summarize(verbose=False)
        attempted += results.attempted
        failed += [module.__name__] * results.failed
    assert failed == [], f"doctest examples failed in {sorted(set(failed))}; run python -m doctest -v on them"
    assert attempted >= 10  # the public API's examples (inject, merge, save_adapter, ...) were found and run


ROOT = PACKAGE.parent  # the repository root: pyproject.toml holds the mypy and ruff settings


def test_package_type_checks_clean_with_mypy(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
               "--cache-dir", str(tmp_path / "mypy_cache"), "-p", "lightning_peft"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mypy reports errors in lightning_peft:\n{result.stdout}{result.stderr}"
    assert "Success: no issues found" in result.stdout


def test_package_lints_clean_with_ruff() -> None:
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", str(PACKAGE)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff reports problems in lightning_peft:\n{result.stdout}{result.stderr}"
    assert "All checks passed" in result.stdout


FILES_ROOM = ("lightning_peft.adapter_files", "lightning_peft.state", "lightning_peft.tensors")


def test_the_in_memory_state_modules_never_import_the_adapter_files_room_above_them() -> None:
    graph = _package_imports()
    below = [(name, target) for name in graph if name.startswith(FILES_ROOM[1:])
             for target in graph[name] if target.startswith(FILES_ROOM[0])]
    assert below == [], f"the in-memory modules import the files room above them: {below}"


def test_no_file_in_the_package_exceeds_500_lines() -> None:
    # a file past 500 lines holds more than one idea: split it along them (README "Architecture")
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert len(lengths) > 40
    assert {name: n for name, n in lengths.items() if n > 500} == {}
