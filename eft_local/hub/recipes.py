"""Model recipes: named triples of GGUF files, local or on the Hugging Face hub.

``recipes.toml`` in the models folder names each triple; the user's own file
(``~/.config/eft-local/recipes.toml``) adds more. ``pull`` downloads hub files into huggingface-hub's
normal cache and checks them against what the hub reports; ``resolve`` finds them there without
any network access (it works with ``HF_HUB_OFFLINE=1``).

Hub settings are read from the environment at call time (``HF_ENDPOINT``, ``HF_HUB_CACHE``,
``HF_HOME``, ``HF_HUB_OFFLINE``) and passed to huggingface-hub explicitly, because
``huggingface_hub.constants`` freezes them when the package is first imported.

Downloads resume, across calls and after Ctrl-C, and each new file is checked against the hub's
size and sha256; see ``download``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from ..core.deltas import Delta, as_delta
from ..core.errors import EFTError
from .download import HubUnreachable, download

ROLES = ("base", "tuned", "reference")
MODELS_DIR_ENV = "EFT_LOCAL_MODELS_DIR"
BUNDLED_PACKAGE = "eft_local.bundled"  # the repo's models/ folder, installed as package data
RECIPES_FILE = "recipes.toml"
OVERLAY_DIR = "eft-local"  # the folder of the user's own recipes.toml, in the XDG config folder
FALLBACK_DEFAULT = "demo"
DEFAULT_ENDPOINT = "https://huggingface.co"


def _bundled_dir() -> Path | None:
    """The installed ``eft_local.bundled`` package's folder (the repo's ``models/`` in an editable install)."""
    try:
        return Path(str(resources.files(BUNDLED_PACKAGE)))
    except ModuleNotFoundError:
        return None


DEFAULT_MODELS_DIR = _bundled_dir()


def models_dir() -> Path:
    """The folder holding ``recipes.toml`` and local models: ``$EFT_LOCAL_MODELS_DIR`` or the bundled one."""
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if DEFAULT_MODELS_DIR is None:
        raise EFTError(f"the bundled recipes (package {BUNDLED_PACKAGE}) are not installed; "
                       f"reinstall eft-local or set {MODELS_DIR_ENV} to a folder with a {RECIPES_FILE}")
    return DEFAULT_MODELS_DIR


def overlay_file() -> Path | None:
    """The user's own recipes: ``$XDG_CONFIG_HOME/eft-local/recipes.toml`` (default ``~/.config/...``).

    None when there is no home folder to look in.
    """
    config = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(config):  # the XDG rule: an empty or relative value is ignored
        try:
            config = os.path.join(Path.home(), ".config")
        except RuntimeError:
            return None
    return Path(config) / OVERLAY_DIR / RECIPES_FILE


MODELS_DIR = models_dir() if os.environ.get(MODELS_DIR_ENV) else DEFAULT_MODELS_DIR  # as of import


@dataclass(frozen=True)
class ModelRef:
    """One model of a recipe: a hub file (``repo`` + ``file``) or a local ``path``."""

    repo: str | None = None
    file: str | None = None
    revision: str | None = None
    path: Path | None = None
    quant: str | None = None

    @property
    def on_hub(self) -> bool:
        return self.repo is not None

    def label(self) -> str:
        if self.repo is None:
            return str(self.path)
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo}{rev}/{self.file}"


@dataclass(frozen=True)
class Recipe:
    """A named set of models: ``base``, ``tuned``, ``reference`` and optional extras.

    ``deltas`` names the (tuned, reference, weight) deltas to combine; by default the one
    delta ``tuned - reference`` at weight 1. ``source`` is the recipes file it was read from.
    """

    name: str
    description: str
    models: dict[str, ModelRef]
    verified: bool = False
    default: bool = False
    deltas: tuple[Delta, ...] = (Delta("tuned", "reference"),)
    source: Path | None = None


# ---------------------------------------------------------------------------------------------
# Reading recipes.toml

_RECIPE_KEYS = {"description", "default", "verified", "deltas"}
_MODEL_KEYS = {"repo", "file", "revision", "path", "quant"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_recipes(path: str | os.PathLike | None = None) -> dict[str, Recipe]:
    """Read and check a recipes file; by default ``models_dir() / "recipes.toml"`` and the overlay file.

    The overlay file (``overlay_file()``, read when it exists) adds recipes; one with the name of a
    recipe in the models folder replaces it, and a default there takes over from the models folder's.
    Local ``path`` entries are made absolute relative to the folder of the file that names them.
    """
    if path is not None:
        return _read_recipes(Path(path))
    recipes = _read_recipes(models_dir() / RECIPES_FILE)
    overlay = overlay_file()
    yours = _read_recipes(overlay, missing_ok=True) if overlay is not None else {}
    if any(r.default for r in yours.values()):
        recipes = {name: replace(r, default=False) for name, r in recipes.items()}
    return recipes | yours


def _read_recipes(path: Path, missing_ok: bool = False) -> dict[str, Recipe]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise EFTError(f"recipe file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise EFTError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise EFTError(f"{path}: invalid TOML: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise EFTError(f"cannot read recipe file {path}: {e.strerror or e}") from None
    recipes = {name: _parse_recipe(name, table, path) for name, table in data.items()}
    defaults = [r.name for r in recipes.values() if r.default]
    if len(defaults) > 1:
        raise EFTError(f"{path}: more than one recipe has default = true ({', '.join(defaults)})")
    return recipes


def _parse_recipe(name: str, table: Any, source: Path) -> Recipe:
    where = f"{source}: recipe {name!r}"
    if not isinstance(table, dict):
        raise EFTError(f"{where} must be a table ([{name}])")
    models: dict[str, ModelRef] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            models[key] = _parse_model(f"{where}, model {key!r}", value, source.parent)
        elif key not in _RECIPE_KEYS:
            raise EFTError(f"{where}: unknown key {key!r} (expected {', '.join(sorted(_RECIPE_KEYS))} or model tables)")
    missing = [role for role in ROLES if role not in models]
    if missing:
        raise EFTError(f"{where} has no {', '.join(missing)} model ([{name}.{missing[0]}])")
    description = table.get("description", "")
    default = table.get("default", False)
    verified = table.get("verified", False)
    if not isinstance(description, str):
        raise EFTError(f"{where}: description must be a string")
    if not isinstance(default, bool) or not isinstance(verified, bool):
        raise EFTError(f"{where}: default and verified must be true or false")
    # Roles first, in their usual order; extras after, in file order.
    ordered = {role: models[role] for role in ROLES}
    ordered.update((k, v) for k, v in models.items() if k not in ROLES)
    deltas = _parse_deltas(where, table.get("deltas"), ordered)
    return Recipe(name=name, description=description, models=ordered, verified=verified, default=default,
                  deltas=deltas, source=source)


def _parse_deltas(where: str, value: Any, models: dict[str, ModelRef]) -> tuple[Delta, ...]:
    """``deltas = [["tuned", "reference", 0.7], ["tuned_b", "reference", 0.3]]`` (weight optional)."""
    if value is None:
        return (Delta("tuned", "reference"),)
    usage = f"{where}: deltas must be a list of [tuned, reference] or [tuned, reference, weight] model names"
    if not isinstance(value, list) or not value:
        raise EFTError(usage)
    out = []
    for item in value:
        # A weight written as a string is a mistake in TOML, where numbers have their own syntax.
        if not isinstance(item, list) or (len(item) == 3 and isinstance(item[2], str)):
            raise EFTError(usage)
        try:
            delta = as_delta(item)
        except EFTError as e:
            raise EFTError(f"{usage} ({e})") from None
        unknown = [x for x in delta[:2] if x not in models]
        if unknown:
            raise EFTError(f"{where}: deltas name {unknown[0]!r}, which is not a model of the recipe")
        out.append(delta)
    return tuple(out)


def _parse_model(where: str, table: dict, root: Path) -> ModelRef:
    unknown = set(table) - _MODEL_KEYS
    if unknown:
        raise EFTError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(_MODEL_KEYS))})")
    for key, value in table.items():
        if not isinstance(value, str) or not value:
            raise EFTError(f"{where}: {key} must be a non-empty string")
    if "path" in table:
        if "repo" in table or "file" in table:
            raise EFTError(f"{where}: give either path or repo + file, not both")
        local = Path(os.path.expandvars(table["path"])).expanduser()
        return ModelRef(path=local if local.is_absolute() else root / local, quant=table.get("quant"))
    if "repo" not in table or "file" not in table:
        raise EFTError(f"{where}: needs repo and file (a hub model) or path (a local file)")
    repo, file = table["repo"], table["file"]
    if not _REPO_ID.match(repo):
        raise EFTError(f"{where}: repo {repo!r} is not an owner/name repo id")
    if file.startswith("/") or ".." in file.split("/"):
        raise EFTError(f"{where}: file {file!r} must be a path inside the repo")
    return ModelRef(repo=repo, file=file, revision=table.get("revision"), quant=table.get("quant"))


def get_recipe(name: str, path: str | os.PathLike | None = None) -> Recipe:
    """The recipe called ``name``; the error lists the known names."""
    recipes = load_recipes(path)
    if name not in recipes:
        raise EFTError(f"unknown recipe {name!r}; known recipes: {', '.join(recipes)}")
    return recipes[name]


def default_recipe(path: str | os.PathLike | None = None) -> str:
    """The name of the recipe marked ``default = true`` ("demo" when none is)."""
    for recipe in load_recipes(path).values():
        if recipe.default:
            return recipe.name
    return FALLBACK_DEFAULT


def _as_recipe(recipe: str | Recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else get_recipe(recipe)


# ---------------------------------------------------------------------------------------------
# Hugging Face settings, read at call time


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """huggingface-hub's cache folder, with the same precedence huggingface-hub uses."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(os.path.expandvars(env[key])).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


# ---------------------------------------------------------------------------------------------
# Finding models locally


def _cached(ref: ModelRef, cache: Path) -> Path | None:
    """The cached snapshot path of a hub model, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(ref.repo, ref.file, cache_dir=cache, revision=ref.revision)
    # A non-string hit is the "known not to exist" marker; a dangling link is not a model either.
    if isinstance(hit, str) and os.path.isfile(hit):
        return Path(hit)
    return None


def resolve(recipe: str | Recipe) -> dict[str, Path]:
    """Local paths for every model of a recipe (roles and extras), without network access.

    Hub models must be in the cache already (``eft-local pull``). Local ``path`` models are
    returned as they are; loading reports a missing file.
    """
    r = _as_recipe(recipe)
    cache = hub_cache_dir()
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for role, ref in r.models.items():
        if ref.path is not None:
            paths[role] = ref.path
            continue
        found = _cached(ref, cache)
        if found is None:
            missing.append(f"{role} ({ref.label()})")
        else:
            paths[role] = found
    if missing:
        raise EFTError(f"recipe {r.name!r}: {', '.join(missing)} not downloaded; run: eft-local pull {r.name}")
    return paths


def status(recipe: str | Recipe) -> dict[str, bool]:
    """Which models of a recipe are present locally (by role)."""
    r = _as_recipe(recipe)
    cache = hub_cache_dir()
    return {
        role: ref.path.is_file() if ref.path is not None else _cached(ref, cache) is not None
        for role, ref in r.models.items()
    }


# ---------------------------------------------------------------------------------------------
# Downloading


def _pull_hub(ref: ModelRef, cache: Path, endpoint: str, progress: bool) -> Path:
    """Download one hub file (if needed) and check it; return its snapshot path."""
    cached = _cached(ref, cache)
    if hub_offline():
        if cached is not None:
            return cached
        raise EFTError(f"cannot download {ref.file} from {ref.repo}: offline mode is on (HF_HUB_OFFLINE); unset it to download")
    try:
        return download(ref.repo, ref.file, ref.revision, cache=cache, endpoint=endpoint, progress=progress)
    except HubUnreachable:
        if cached is None or not cached.is_file():  # not there, or found damaged and removed
            raise
        return cached  # the hub is unreachable; what is cached is still usable


def pull(recipe: str | Recipe, progress: bool = True) -> dict[str, Path]:
    """Download every hub model of a recipe into huggingface-hub's cache; return all local paths.

    Files already in the cache are not downloaded again. Local ``path`` models must exist.
    """
    r = _as_recipe(recipe)
    # Local files first, so a missing one fails before gigabytes are fetched.
    for role, ref in r.models.items():
        if ref.path is not None and not ref.path.is_file():
            raise EFTError(f"recipe {r.name!r}: {role} model {ref.path} is missing (a local file; nothing to download)")
    cache, endpoint = hub_cache_dir(), hub_endpoint()
    return {
        role: ref.path if ref.path is not None else _pull_hub(ref, cache, endpoint, progress)
        for role, ref in r.models.items()
    }


def recipe_models(name: str | None = None) -> tuple[Path, list[Delta]]:
    """The base file and the deltas of recipe ``name`` (None: the default one), as local paths
    found without network access."""
    recipe = get_recipe(name or default_recipe())
    paths = resolve(recipe)
    return paths["base"], [Delta(str(paths[t]), str(paths[r]), w) for t, r, w in recipe.deltas]


def data_file(name: str | os.PathLike) -> Path:
    """A data file: a path, or a set in the models folder by name ("demo/heldout", from any folder)."""
    path = Path(name)
    try:
        if path.exists():
            return path
    except OSError:
        return path  # there but out of reach: reading it says why, in one line
    root = models_dir()
    for candidate in (root / path, root / f"{path}.jsonl"):
        if candidate.is_file():
            return candidate
    known = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.jsonl"))
    raise EFTError(f"no data file {name} (nor a set of that name in {root}: {', '.join(known) or 'none'})")


@contextlib.contextmanager
def quiet_hub(verbose: bool) -> Iterator[None]:
    """A block in which huggingface-hub's own notices (retries) stay off stderr unless ``verbose``:
    a failed download ends in one line of eft-local's."""
    import huggingface_hub  # noqa: F401 - its logger is configured on import, so quiet it after

    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    if not verbose:
        hub.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        hub.setLevel(level)


def describe(ref: ModelRef, root: Path | None = None) -> str:
    """A short display form: ``repo file`` for hub models, the path (relative to ``root``) for local ones."""
    if ref.path is None:
        rev = f"@{ref.revision}" if ref.revision else ""
        return f"{ref.repo}{rev} {ref.file}"
    root = root or models_dir()
    try:
        return str(ref.path.relative_to(root))
    except ValueError:
        return str(ref.path)

