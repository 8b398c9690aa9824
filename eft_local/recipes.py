"""Model recipes: named triples of GGUF files, local or on the Hugging Face hub.

``models/recipes.toml`` names each triple. ``pull`` downloads hub files into huggingface-hub's
normal cache and checks them against what the hub reports; ``resolve`` finds them there without
any network access (it works with ``HF_HUB_OFFLINE=1``).

Hub settings are read from the environment at call time (``HF_ENDPOINT``, ``HF_HUB_CACHE``,
``HF_HOME``, ``HF_HUB_OFFLINE``) and passed to huggingface-hub explicitly, because
``huggingface_hub.constants`` freezes them when the package is first imported.

Downloads are ``hf_hub_download``'s own. A connection that drops mid-file is resumed within the
same call with a ``Range`` request (huggingface-hub retries up to five times without progress).
A call that fails or is interrupted (Ctrl-C) keeps nothing in huggingface-hub 2.x, which writes
to a per-call temporary file and deletes it; 0.x kept ``<blob>.incomplete`` and resumed it on the
next pull. Either way a later pull completes the file.

Checks: huggingface-hub compares the bytes received with the size the hub reported. After a
download the file's size is compared again, and its content with the etag the hub reported:
sha256 for LFS files (every GGUF), the git blob id for small files. Hashing reads the file once
(about 20-40 s for 40 GB), so files already in the cache get the size check only; one that fails
it is downloaded again. A fresh download that fails a check is deleted from the cache.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EFTError

ROLES = ("base", "tuned", "reference")
MODELS_DIR_ENV = "EFT_LOCAL_MODELS_DIR"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
RECIPES_FILE = "recipes.toml"
FALLBACK_DEFAULT = "demo"
DEFAULT_ENDPOINT = "https://huggingface.co"


def models_dir() -> Path:
    """The folder holding ``recipes.toml`` and local models: ``$EFT_LOCAL_MODELS_DIR`` or the repo's ``models/``."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser().resolve() if env else DEFAULT_MODELS_DIR


MODELS_DIR = models_dir()


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
    """A named set of models: ``base``, ``tuned``, ``reference`` and optional extras."""

    name: str
    description: str
    models: dict[str, ModelRef]
    verified: bool = False
    default: bool = False


# ---------------------------------------------------------------------------------------------
# Reading recipes.toml

_RECIPE_KEYS = {"description", "default", "verified"}
_MODEL_KEYS = {"repo", "file", "revision", "path", "quant"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_recipes(path: str | os.PathLike | None = None) -> dict[str, Recipe]:
    """Read and check a recipes file (default: ``models_dir() / "recipes.toml"``).

    Local ``path`` entries are made absolute relative to the file's folder.
    """
    path = Path(path) if path is not None else models_dir() / RECIPES_FILE
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise EFTError(f"recipe file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise EFTError(f"{path}: invalid TOML: {e}") from None
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
    return Recipe(name=name, description=description, models=ordered, verified=verified, default=default)


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


def _repo_folder(repo: str) -> str:
    # huggingface-hub's documented cache layout: hub/models--owner--name/{blobs,snapshots,refs}.
    return "models--" + repo.replace("/", "--")


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


class _NoProgress:
    """A progress bar that shows nothing (passed as huggingface-hub's tqdm_class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class _Mismatch(Exception):
    """A downloaded file differs from what the hub reported."""


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "could not talk to the hub", for whichever HTTP stack is loaded."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    # Only modules already imported by huggingface-hub: httpx2 (2.x), httpx (1.x), requests (0.x).
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        mod = sys.modules.get(module)
        types += [getattr(mod, n) for n in names if mod is not None and isinstance(getattr(mod, n, None), type)]
    return tuple(types)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _download_error(ref: ModelRef, endpoint: str, e: BaseException) -> EFTError:
    """One line that names the repo and file and says what went wrong."""
    from huggingface_hub import utils as hfu

    # Subclasses before their bases: gated < repo-not-found, local/remote entry < entry, offline < ConnectionError.
    if isinstance(e, hfu.OfflineModeIsEnabled):
        why = "offline mode is on (HF_HUB_OFFLINE); unset it to download"
    elif isinstance(e, hfu.GatedRepoError):
        why = "the repository is gated: accept its licence on the hub and log in (hf auth login, or set HF_TOKEN)"
    elif isinstance(e, hfu.RepositoryNotFoundError):
        why = "repository not found (or private)"
    elif isinstance(e, hfu.RevisionNotFoundError):
        why = f"revision {ref.revision or 'main'!r} not found"
    elif isinstance(e, hfu.LocalEntryNotFoundError):
        why = f"cannot reach {endpoint} and the file is not in the cache"
    elif isinstance(e, hfu.EntryNotFoundError):
        why = "file not found in the repository"
    elif isinstance(e, _network_errors()):
        why = f"cannot reach {endpoint} ({_first_line(e)})"
    elif isinstance(e, hfu.HfHubHTTPError):
        code = getattr(getattr(e, "response", None), "status_code", None)
        why = f"HTTP {code}: {_first_line(e)}" if code else _first_line(e)
    elif isinstance(e, OSError):
        why = _first_line(e)
    else:
        why = f"{type(e).__name__}: {_first_line(e)}"
    rev = f" (revision {ref.revision})" if ref.revision else ""
    return EFTError(f"cannot download {ref.file} from {ref.repo}{rev}: {why}")


def _file_matches(path: Path, etag: str | None, size: int | None, *, check_size: bool, hash_it: bool) -> None:
    """Raise _Mismatch unless the file has the hub's size and, when asked, the content its etag names."""
    actual = path.stat().st_size
    if check_size and size is not None and actual != size:
        raise _Mismatch(f"{actual} bytes, the hub reports {size}")
    if not hash_it or etag is None:
        return
    with open(path, "rb") as f:
        if _SHA256.match(etag):  # LFS (and Xet) files: the etag is the content's sha256
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        elif _SHA1.match(etag):  # plain git files: the etag is the git blob id
            h = hashlib.sha1(b"blob %d\0" % actual)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            digest = h.hexdigest()
        else:
            return
    if digest != etag:
        raise _Mismatch(f"content hash {digest[:12]}..., the hub reports {etag[:12]}...")


def _blob_entry(path: Path) -> Path | None:
    """The ``blobs/<etag>`` entry a snapshot link points to (one level only), or None for a copy.

    Not the final target: huggingface-hub 2.x may link that entry on into a store shared by
    several repos, whose files are named by Xet hash and must not be deleted from here.
    """
    if not path.is_symlink():
        return None
    return Path(os.path.normpath(path.parent / os.readlink(path)))


def _remove_cached(path: Path) -> None:
    """Delete a snapshot entry and its blob entry, so resolve cannot pick it up."""
    for p in (path, _blob_entry(path)):
        if p is not None:
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def _hf_download(ref: ModelRef, cache: Path, endpoint: str, progress: bool) -> Path:
    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = {}
    if not progress and "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = _NoProgress
    try:
        return Path(hf_hub_download(ref.repo, ref.file, revision=ref.revision, cache_dir=cache,
                                    endpoint=endpoint, **kwargs))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming repo and file
        raise _download_error(ref, endpoint, e) from None


def _pull_hub(ref: ModelRef, cache: Path, endpoint: str, progress: bool) -> Path:
    """Download one hub file (if needed) and check it; return its snapshot path."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    cached = _cached(ref, cache)
    if hub_offline():
        if cached is not None:
            return cached
        raise EFTError(f"cannot download {ref.file} from {ref.repo}: offline mode is on (HF_HUB_OFFLINE); unset it to download")
    # Ask the hub first: the answer (etag, size) is what the file is checked against, and a
    # missing repo or file fails here before anything is written to the cache.
    try:
        meta = get_hf_file_metadata(hf_hub_url(ref.repo, ref.file, revision=ref.revision, endpoint=endpoint))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        if cached is not None and isinstance(e, _network_errors()):
            return cached  # the hub is unreachable; what is cached is still usable
        raise _download_error(ref, endpoint, e) from None
    etag, size = meta.etag, meta.size
    blob = cache / _repo_folder(ref.repo) / "blobs" / etag if etag else None
    had_blob = blob is not None and blob.is_file()

    for attempt in (1, 2):
        path = _hf_download(ref, cache, endpoint, progress)
        # The blob a snapshot links to is named by the etag huggingface-hub downloaded against;
        # if the hub changed between the two requests, check against that etag, not ours.
        blob_entry = _blob_entry(path)
        used = blob_entry.name if blob_entry is not None else etag
        try:
            # Size is a stat; hashing reads the whole file, so it is done once, right after a
            # download, and not again for files that were already in the cache.
            _file_matches(path, used, size, check_size=(used == etag), hash_it=not had_blob)
            return path
        except _Mismatch as m:
            _remove_cached(path)
            if had_blob and attempt == 1:
                had_blob = False  # a cached copy went bad on disk: download it again, once
                continue
            raise EFTError(f"{ref.file} from {ref.repo} does not match what {endpoint} reports ({m}); "
                           f"removed it, run the pull again") from None
    raise AssertionError("unreachable")


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


__all__ = [
    "MODELS_DIR", "ROLES", "ModelRef", "Recipe", "default_recipe", "describe", "get_recipe",
    "hub_cache_dir", "hub_endpoint", "hub_offline", "load_recipes", "models_dir", "pull",
    "resolve", "status",
]
