"""Where recipes come from: the bundled models folder, and the user's own recipes.toml overlay."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from eft_local.hub import recipes as rc
from eft_local.cli import main
from eft_local.core.errors import EFTError

@pytest.fixture(autouse=True)
def config(tmp_path, monkeypatch) -> Path:
    """A private XDG config folder (empty) and the bundled models folder."""
    folder = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    monkeypatch.delenv("EFT_LOCAL_MODELS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return folder


def write_overlay(config: Path, text: str) -> Path:
    path = config / "eft-local" / "recipes.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def recipe(name: str, d: str = "models", files: tuple[str, ...] = ("b", "t", "r"), **keys: str) -> str:
    """A recipe of three local files, ``d/b.gguf`` and so on, with extra top-level ``keys``."""
    head = f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    return head + "".join(f'[{name}.{role}]\npath = "{d}/{f}.gguf"\n' for role, f in zip(rc.ROLES, files))


# ---------------------------------------------------------------------------------------------
# The bundled folder


def test_bundled_folder_is_the_installed_package():
    folder = Path(str(resources.files("eft_local.bundled")))
    assert rc.models_dir() == rc.DEFAULT_MODELS_DIR == folder
    assert (folder / "recipes.toml").is_file() and (folder / "demo" / "base.gguf").is_file()


def test_models_dir_override_still_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("EFT_LOCAL_MODELS_DIR", str(tmp_path / "mine"))
    assert rc.models_dir() == (tmp_path / "mine").resolve()


def test_missing_bundled_package_is_one_line(monkeypatch):
    monkeypatch.setattr(rc, "DEFAULT_MODELS_DIR", None)
    with pytest.raises(EFTError, match=r"^the bundled recipes .* not installed; .*EFT_LOCAL_MODELS_DIR") as info:
        rc.models_dir()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The overlay file


def test_overlay_is_in_the_xdg_config_folder(config, tmp_path, monkeypatch):
    assert rc.overlay_file() == config / "eft-local" / "recipes.toml"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in ("", "relative/config"):  # the XDG rule: empty and relative values are ignored
        monkeypatch.setenv("XDG_CONFIG_HOME", unset)
        assert rc.overlay_file() == tmp_path / "home" / ".config" / "eft-local" / "recipes.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert rc.overlay_file() == tmp_path / "home" / ".config" / "eft-local" / "recipes.toml"


def test_no_overlay_means_the_bundled_recipes():
    assert rc.load_recipes() == rc.load_recipes(rc.models_dir() / "recipes.toml")
    assert rc.default_recipe() == "demo"


def test_overlay_adds_and_replaces_recipes(config):
    path = write_overlay(config, recipe("mine", description='"my triple"') + recipe("smollm2", d="/abs"))
    recipes = rc.load_recipes()
    assert {"demo", "qwen2.5", "llama2", "mine", "smollm2"} <= set(recipes)
    assert recipes["mine"].source == path and recipes["mine"].description == "my triple"
    assert recipes["smollm2"].source == path and recipes["smollm2"].models["base"].path == Path("/abs/b.gguf")
    assert recipes["demo"].source == rc.models_dir() / "recipes.toml"
    # Relative paths belong to the overlay's folder, not the models folder or the working folder.
    assert recipes["mine"].models["tuned"].path == path.parent / "models" / "t.gguf"
    assert rc.resolve("mine")["reference"] == path.parent / "models" / "r.gguf"
    assert rc.default_recipe() == "demo"


def test_an_overlay_default_takes_over(config):
    write_overlay(config, recipe("mine", default="true"))
    assert rc.default_recipe() == "mine"
    assert [r.name for r in rc.load_recipes().values() if r.default] == ["mine"]


def test_overlay_applies_over_a_moved_models_folder(config, tmp_path, monkeypatch):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "recipes.toml").write_text(recipe("theirs", default="true"))
    monkeypatch.setenv("EFT_LOCAL_MODELS_DIR", str(folder))
    write_overlay(config, recipe("mine"))
    assert list(rc.load_recipes()) == ["theirs", "mine"]
    assert rc.default_recipe() == "theirs"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[mine\n", r"invalid TOML"),
        (recipe("mine").split("[mine.reference]")[0].encode(), r"recipe 'mine' has no reference model"),
        ((recipe("a", default="true") + recipe("b", default="true")).encode(), r"more than one recipe has default"),
        (b'[mine]\ndescription = "caf\xe9"\n', r"invalid TOML: not UTF-8 text"),
        (None, r"cannot read recipe file"),
    ],
    ids=["toml", "no-reference", "two-defaults", "not-utf8", "a-folder"],
)
def test_overlay_errors_are_one_line_naming_the_file(config, content, message):
    path = config / "eft-local" / "recipes.toml"
    if content is None:
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    with pytest.raises(EFTError, match=message) as info:
        rc.load_recipes()
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    for args in (["models"], ["generate", "Hi"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1
        assert len(result.stderr.splitlines()) == 1 and str(path) in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# eft-local models and generate


def test_models_says_where_each_recipe_comes_from(config):
    path = write_overlay(config, recipe("mine") + recipe("demo", default="true", description='"my demo"'))
    (path.parent / "models").mkdir()
    (path.parent / "models" / "b.gguf").write_bytes(b"GGUF")
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert re.search(r"^mine \(unverified, yours\)$", out, re.M)
    assert re.search(r"^demo \(default, unverified, yours, replaces the bundled one\): my demo$", out, re.M)
    assert re.search(r"^smollm2: ", out, re.M)
    assert re.search(r"^  base\s+models/b.gguf\s+present$", out, re.M)
    assert re.search(r"^  tuned\s+models/t.gguf\s+missing$", out, re.M)
    assert re.search(rf"^bundled recipes: {re.escape(str(rc.models_dir() / 'recipes.toml'))}$", out, re.M)
    assert re.search(rf"^your recipes:\s+{re.escape(str(path))} \(2 recipes\)$", out, re.M)


def test_models_without_an_overlay_says_where_it_would_be(config):
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    assert f"your recipes:    {config / 'eft-local' / 'recipes.toml'} (none yet)" in result.stdout
    assert "yours" not in result.stdout.split("\n\n")[0]


def test_generate_uses_an_overlay_recipe(config):
    demo = rc.models_dir() / "demo"
    write_overlay(config, recipe("mine", d=str(demo), files=rc.ROLES, default="true"))
    result = CliRunner().invoke(main, ["generate", "--temperature", "0", "--max-tokens", "8", "Where was Patroul born?"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
