"""The architecture holds by construction: layers, no import circles, llama-cpp-python used as it is."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts of pyproject.toml, over the eft_local package found in ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_are_kept():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("core/errors.py", "from ..engine import eft", "each layer imports only from the layers below it"),
    ("runtime/log.py", "import click", "the library needs no command line or HTTP server"),
    ("core/text.py", "import llama_cpp", "the library below the surfaces needs neither llama.cpp"),
    ("hub/recipes.py", "from ..runtime import vocab", "each layer imports only from the layers below it"),
    ("evaluation/evaluate.py", "import huggingface_hub", "huggingface-hub is the hub layer's alone"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "eft_local", tmp_path / "eft_local", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / "eft_local" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]
    assert " ".join(result.stdout.split()).count(f"{broken}") >= 1 and "BROKEN" in result.stdout


def test_no_import_circles():
    graph = grimp.build_graph("eft_local")
    circles = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            # eft_local/__init__.py is the public facade: importing any submodule runs it.
            if importer != "eft_local" and imported != "eft_local" and graph.chain_exists(imported, importer):
                circles.append(f"{importer} -> {imported}")
    assert not circles, circles


def _llama_cpp_misuse(tree: ast.AST) -> list[str]:
    """Assignments to attributes of llama_cpp or of what a module imported from it (monkeypatching),
    and private llama_cpp names read or imported."""
    bound = {"llama_cpp"}  # names that refer to llama_cpp or to something in it
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "llama_cpp"}
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "llama_cpp":
            bound |= {a.asname or a.name for a in node.names}
    private = lambda name: name.startswith("_") and not name.endswith("__")  # noqa: E731 - dunders are public
    found = []
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            if isinstance(t, ast.Attribute) and ast.unparse(t).split(".")[0] in bound:
                found.append(f"assigns {ast.unparse(t)}")
        if (isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and node.args
                and ast.unparse(node.args[0]).split(".")[0] in bound):
            found.append(f"setattr on {ast.unparse(node.args[0])}")
        if isinstance(node, ast.Attribute) and private(node.attr) and ast.unparse(node.value).split(".")[0] in bound:
            found.append(f"reads {ast.unparse(node)}")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "llama_cpp":
            names = [a.name for a in node.names if private(a.name)] + [p for p in node.module.split(".") if private(p)]
            if names:
                found.append(f"imports {names} from {node.module}")
    return found


def test_llama_cpp_is_neither_patched_nor_read_privately():
    misuse = {}
    for path in sorted((ROOT / "eft_local").rglob("*.py")):
        found = _llama_cpp_misuse(ast.parse(path.read_text()))
        if found:
            misuse[str(path.relative_to(ROOT))] = found
    assert not misuse, misuse
    # The check finds what it looks for.
    assert len(_llama_cpp_misuse(ast.parse(
        "import llama_cpp\nfrom llama_cpp import llama_chat_format\nllama_cpp.llama_cpp.llama_model_default_params = f\n"
        "llama_chat_format.Jinja2ChatFormatter = g\nx = llama_cpp.Llama(p)._model\nfrom llama_cpp._ggml import libggml\n"
        "setattr(llama_cpp, 'x', 1)\nlogger.propagate = False\ny = llama_cpp.__version__\n"))) == 5
