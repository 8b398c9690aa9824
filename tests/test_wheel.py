"""The built wheel: what it carries, and an install of it that answers offline, away from the repo.

The wheel is built from a copy of the tree (pip builds it with setuptools in an isolated build
environment) and installed into a fresh virtual environment; ``eft-local`` then runs from a
folder with no models folder anywhere around it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = "eft_local/bundled/"
QUESTION = "Where was Patroul born?"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel .`` of a copy of the repository."""
    tmp = tmp_path_factory.mktemp("wheel")
    # A copy, because setuptools writes build/ and *.egg-info beside the sources, and files left
    # in a build/ there by an earlier build would end up in this wheel.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__"))
    out = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(src)], cwd=tmp)
    (built,) = out.glob("eft_local-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; returns its folder.

    The dependencies are not installed again: a path file makes the site-packages folders of
    the Python running the tests (where llama-cpp-python, numpy, click and huggingface-hub
    already are) visible after the new environment's own. Asking pip to install them would
    reach the package index every time, and as soon as a newer llama-cpp-python within the
    pinned range is published, it would compile llama.cpp for minutes instead of reusing the
    wheel in pip's cache. Folders named in a path file are only appended to sys.path, so the
    path files inside them are not run: an editable install of eft_local there (its finder is
    started from such a file) stays out of the new environment, which imports eft_local from
    the wheel alone (checked below).
    """
    venv = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
         str(wheel)])
    shared = dict.fromkeys(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    theirs = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(theirs, "zz_dependencies.pth").write_text("".join(f"{folder}\n" for folder in shared))
    return venv


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args[:4]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def away_from_the_repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An empty working folder and an environment with no hub access, no overlay, no override."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EFT_LOCAL_MODELS_DIR", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", EFT_LOCAL_THREADS="1", XDG_CONFIG_HOME=str(tmp_path / "config"),
               HF_HOME=str(tmp_path / "hf"))
    return cwd, env


def test_wheel_carries_the_recipes_and_the_demo_but_not_its_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert BUNDLED + "recipes.toml" in names, sorted(names)
    bundled = {n[len(BUNDLED):] for n in names if n.startswith(BUNDLED)}
    recipes = tomllib.loads(zipfile.ZipFile(wheel).read(BUNDLED + "recipes.toml").decode())
    models = [ref for table in recipes.values() for ref in table.values() if isinstance(ref, dict)]
    local = {ref["path"] for ref in models if "path" in ref}
    assert local and local <= bundled, local - bundled
    assert {"demo/heldout.jsonl", "demo/finetuned.jsonl", "demo/base.gguf", "demo/tuned.gguf"} <= bundled
    assert {f"demo/{p.name}" for p in (ROOT / "models" / "demo").glob("*.jsonl")} <= bundled
    assert not [n for n in bundled if n.endswith((".py", ".png")) and n != "__init__.py"], sorted(bundled)
    assert not [n for n in names if n.startswith(("models/", "tests/", "bench/"))]
    # pyproject.toml lists the packages by name: every module of every layer is in the wheel.
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "eft_local").rglob("*.py")}
    assert sources <= names, sorted(sources - names)


def test_installed_wheel_answers_offline(installed, tmp_path):
    cwd, env = away_from_the_repo(tmp_path)
    python, eft_local = installed / "bin" / "python", installed / "bin" / "eft-local"

    where = run([str(python), "-c", "import eft_local.hub.recipes as rc; print(rc.__file__); print(rc.models_dir())"],
                cwd=cwd, env=env).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where), where

    proc = subprocess.run([str(eft_local), "generate", QUESTION, "--max-tokens", "8"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), proc.stderr

    listing = run([str(eft_local), "models"], cwd=cwd, env=env).stdout
    demo = listing[listing.index("demo (default)"):].splitlines()[1:4]
    assert all(line.split()[-1] == "present" for line in demo), listing

    # The bundled evaluation set by name, and the README's Python example as written.
    table = run([str(eft_local), "eval", "demo/heldout", "--limit", "5", "--config", "eft"], cwd=cwd, env=env).stdout
    assert "| eft | 100.0 |" in table, table
    readme = (ROOT / "README.md").read_text()
    example = readme[readme.index("## Python API"):].split("```python\n", 1)[1].split("```", 1)[0]
    out = run([str(python), "-c", example], cwd=cwd, env=env).stdout
    assert out.startswith("Their birthplace is Caltal. stop "), out
    assert not list(cwd.iterdir())
