"""Model recipes: named triples of GGUF files, local or on the Hugging Face hub.

``models/recipes.toml`` names each triple. ``pull`` downloads hub files into huggingface-hub's
normal cache and checks them against what the hub reports; ``resolve`` finds them there without
any network access (it works with ``HF_HUB_OFFLINE=1``).

Hub settings are read from the environment at call time (``HF_ENDPOINT``, ``HF_HUB_CACHE``,
``HF_HOME``, ``HF_HUB_OFFLINE``) and passed to huggingface-hub explicitly, because
``huggingface_hub.constants`` freezes them when the package is first imported.

Downloads resume. ``pull`` asks the hub for a file's commit, etag and size, then streams it with
huggingface-hub's HTTP session into ``blobs/<etag>.incomplete`` in the repo's cache folder (the
name huggingface-hub 0.x used; ``hf cache scan`` lists such files and ``hf cache prune`` deletes
them), appending bytes as they arrive. A dropped connection or a busy server is retried within the
call with a ``Range`` request for the rest (five attempts in a row without new bytes end the call).
A pull that fails or is interrupted (Ctrl-C) keeps the partial file and the next pull continues
it; a server that ignores ``Range`` is read from the start. The complete file is renamed to
``blobs/<etag>``, linked from ``snapshots/<commit>/<file>`` and named by ``refs/<revision>``:
huggingface-hub's own layout, so its lookups find it. Files stored with Xet come over plain HTTP
too. huggingface-hub's lock for the blob (``.locks/<repo>/<etag>.lock``) keeps two pulls from
writing the same partial file.

Checks: the size the server announces must be the one the hub reported. A complete download is
checked against the hub's size and etag (sha256 for LFS files, i.e. every GGUF; the git blob id
for small files), and one that fails is deleted, resumed bytes included. Hashing reads the file
once (about 20-40 s for 40 GB), so files already in the cache get the size check only; one that
fails it is downloaded again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    """A named set of models: ``base``, ``tuned``, ``reference`` and optional extras.

    ``deltas`` names the (tuned, reference, weight) deltas to combine; by default the one
    delta ``tuned - reference`` at weight 1.
    """

    name: str
    description: str
    models: dict[str, ModelRef]
    verified: bool = False
    default: bool = False
    deltas: tuple[tuple[str, str, float], ...] = (("tuned", "reference", 1.0),)


# ---------------------------------------------------------------------------------------------
# Reading recipes.toml

_RECIPE_KEYS = {"description", "default", "verified", "deltas"}
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
    deltas = _parse_deltas(where, table.get("deltas"), ordered)
    return Recipe(name=name, description=description, models=ordered, verified=verified, default=default,
                  deltas=deltas)


def _parse_deltas(where: str, value: Any, models: dict[str, ModelRef]) -> tuple[tuple[str, str, float], ...]:
    """``deltas = [["tuned", "reference", 0.7], ["tuned_b", "reference", 0.3]]`` (weight optional)."""
    if value is None:
        return (("tuned", "reference", 1.0),)
    usage = f"{where}: deltas must be a list of [tuned, reference] or [tuned, reference, weight] model names"
    if not isinstance(value, list) or not value:
        raise EFTError(usage)
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) not in (2, 3) or not all(isinstance(x, str) for x in item[:2]):
            raise EFTError(usage)
        if len(item) == 3 and (isinstance(item[2], bool) or not isinstance(item[2], (int, float))):
            raise EFTError(usage)
        unknown = [x for x in item[:2] if x not in models]
        if unknown:
            raise EFTError(f"{where}: deltas name {unknown[0]!r}, which is not a model of the recipe")
        out.append((item[0], item[1], float(item[2]) if len(item) == 3 else 1.0))
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

_RETRIES = 5  # attempts in a row that receive no new bytes before a pull gives up
_RETRY_WAIT_S = 1.0  # first pause between attempts; it doubles up to _RETRY_WAIT_MAX_S
_RETRY_WAIT_MAX_S = 8.0
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_PARTIAL_SUFFIX = ".incomplete"


class _NoProgress:
    """A progress bar that shows nothing."""

    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(desc: str, total: int | None, initial: int, enabled: bool) -> Any:
    """huggingface-hub's tqdm, so ``HF_HUB_DISABLE_PROGRESS_BARS`` and its helpers apply."""
    if not enabled:
        return _NoProgress()
    from huggingface_hub.utils import tqdm

    if len(desc) > 40:
        desc = f"(…){desc[-40:]}"
    # disable=None: tqdm's own rule, no bar when stderr is not a terminal.
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, disable=None)


class _Mismatch(Exception):
    """A downloaded file differs from what the hub reported."""


class _Retry(Exception):
    """An answer worth asking again for (a busy or failing server, a stream that ended early)."""


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")

# Exception types of whichever HTTP stack huggingface-hub loaded: httpx2 (2.x), httpx (1.x), requests (0.x).
_NETWORK_NAMES = (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                  ("requests", ("ConnectionError", "Timeout", "exceptions.ChunkedEncodingError")),
                  ("urllib3", ("exceptions.ProtocolError", "exceptions.TimeoutError")))
_RETRY_NAMES = (("httpx2", ("NetworkError", "TimeoutException", "RemoteProtocolError")),
                ("httpx", ("NetworkError", "TimeoutException", "RemoteProtocolError")),
                ("requests", ("ConnectionError", "Timeout", "exceptions.ChunkedEncodingError")),
                ("urllib3", ("exceptions.ProtocolError", "exceptions.TimeoutError")))


def _loaded_types(spec: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in spec:
        mod = sys.modules.get(module)
        for name in names if mod is not None else ():
            obj: Any = mod
            for part in name.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, type):
                types.append(obj)
    return tuple(types)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "could not talk to the hub"."""
    return _loaded_types(_NETWORK_NAMES)


def _retry_errors() -> tuple[type[BaseException], ...]:
    """Exception types of a transfer that may succeed when tried again (not e.g. a bad proxy URL)."""
    return _loaded_types(_RETRY_NAMES) + (_Retry,)


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
    elif isinstance(e, (OSError, _Retry)):
        why = _first_line(e)
    else:
        why = f"{type(e).__name__}: {_first_line(e)}"
    return EFTError(f"cannot download {ref.file} from {ref.repo}{_rev(ref)}: {why}")


def _rev(ref: ModelRef) -> str:
    return f" (revision {ref.revision})" if ref.revision else ""


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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _download_timeout() -> float:
    """Seconds to wait for the server between bytes (huggingface-hub's ``HF_HUB_DOWNLOAD_TIMEOUT``)."""
    try:
        return float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or 10)
    except ValueError:
        return 10.0


@contextmanager
def _get(url: str, headers: dict[str, str]) -> Iterator[tuple[Any, Any]]:
    """A streaming GET on huggingface-hub's shared session: (response, chunk iterator factory).

    Chunks come as the network delivers them, so everything received is written before an
    error surfaces. The session is httpx2 or httpx (huggingface-hub 1.x and later) or requests (0.x).
    """
    from huggingface_hub.utils import get_session

    session = get_session()
    if callable(getattr(session, "stream", None)):  # requests.Session.stream is a flag
        with session.stream("GET", url, headers=headers, timeout=_download_timeout(), follow_redirects=True) as r:
            yield r, r.iter_bytes
    else:
        with session.get(url, headers=headers, timeout=_download_timeout(), stream=True) as r:
            yield r, lambda: _raw_chunks(r)


def _raw_chunks(response: Any) -> Iterator[bytes]:
    """A requests body as it arrives: urllib3 2's ``read1`` hands over what came before a drop."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 1 loses at most one chunk
        yield from response.iter_content(chunk_size=1 << 16)
        return
    while chunk := read1(1 << 20):
        yield chunk


def _resume_offset(response: Any, have: int) -> int:
    """Where the body starts in the file: ``have`` for a matching 206, else 0 (start over)."""
    if not have or response.status_code != 206:
        return 0
    m = re.match(r"\s*bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
    return have if m and int(m[1]) == have else -1


def _announced_size(response: Any, start: int) -> int | None:
    """The file size the answer implies (Content-Range total, else start + Content-Length)."""
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None  # a compressed body's length says nothing about the file
    m = re.search(r"/(\d+)\s*$", response.headers.get("Content-Range", ""))
    if m:
        return int(m[1])
    length = response.headers.get("Content-Length")
    return start + int(length) if length and length.isdigit() else None


def _fetch(url: str, headers: dict[str, str], partial: Path, size: int | None, desc: str, progress: bool) -> None:
    """Bring ``partial`` up to the whole file, asking only for the bytes it lacks.

    Bytes are appended as they arrive, so a dropped connection, a crash or Ctrl-C keeps all that
    was received. Raises _Mismatch when the server offers a file of another size than the hub
    reported, and the HTTP stack's own error after _RETRIES attempts in a row without progress.
    """
    from huggingface_hub.utils import hf_raise_for_status

    retry_errors = _retry_errors()
    misses, wait = 0, _RETRY_WAIT_S
    bar = None
    try:
        while True:
            have = _size(partial)
            if size is not None and have > size:  # longer than the file: not a prefix of it
                partial.unlink()
                have = 0
            if size is not None and have == size:
                return
            if bar is None:
                bar = _progress_bar(desc, size, have, progress)
            got = 0
            try:
                # identity: a compressed body would not line up with byte offsets into the file.
                asked = {**headers, "Accept-Encoding": "identity"}
                if have:
                    asked["Range"] = f"bytes={have}-"
                with _get(url, asked) as (response, chunks):
                    status = response.status_code
                    if status == 416 and have:  # the server's file is shorter than the partial one
                        partial.unlink()
                        continue
                    if status in _RETRY_STATUS and misses + 1 < _RETRIES:
                        raise _Retry(f"HTTP {status}")
                    if status >= 400:
                        if hasattr(response, "read"):
                            response.read()  # error details are in the body; httpx streams must be read first
                        hf_raise_for_status(response)
                    start = _resume_offset(response, have)
                    if start < 0:  # a range other than the one asked for: drop the partial file
                        partial.unlink()
                        continue
                    announced = _announced_size(response, start)
                    if size is not None and announced is not None and announced != size:
                        partial.unlink(missing_ok=True)
                        raise _Mismatch(f"the server offers {announced} bytes, the hub reports size {size}")
                    bar.update(start - bar.n)  # back to 0 when the server ignored Range
                    with open(partial, "ab" if start else "wb") as f:
                        for chunk in chunks():
                            f.write(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
                have = _size(partial)
                if size is None or have == size:
                    return
                if have > size:
                    partial.unlink()
                    raise _Mismatch(f"received {have} bytes, the hub reports size {size}")
                raise _Retry(f"the connection closed after {have} of {size} bytes")
            except retry_errors:
                misses = 0 if got else misses + 1
                if got:
                    wait = _RETRY_WAIT_S
                if misses >= _RETRIES:
                    raise
                time.sleep(wait)
                wait = min(wait * 2, _RETRY_WAIT_MAX_S)
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def _blob_lock(cache: Path, repo: str, etag: str) -> Iterator[None]:
    """huggingface-hub's own lock for a blob, so a concurrent pull (or hf_hub_download) waits."""
    path = cache / ".locks" / _repo_folder(repo) / f"{etag}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from huggingface_hub.utils import WeakFileLock as lock
    except ImportError:  # older huggingface-hub
        from filelock import FileLock as lock
    with lock(path):
        yield


def _link(blob: Path, pointer: Path, new_blob: bool) -> None:
    """Make ``snapshots/<commit>/<file>`` point at its blob, as huggingface-hub's ``_create_symlink`` does.

    A relative link (the cache folder can move); where links fail or are switched off
    (``HF_HUB_DISABLE_SYMLINKS``) the snapshot entry holds the file itself.
    """
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(pointer):
        pointer.unlink()
    if not _truthy(os.environ.get("HF_HUB_DISABLE_SYMLINKS")):
        try:
            os.symlink(os.path.relpath(blob, pointer.parent), pointer)
            return
        except OSError:
            pass  # e.g. Windows without developer mode, some network file systems
    if new_blob:
        shutil.move(blob, pointer)
    else:
        shutil.copyfile(blob, pointer)  # the blob may be linked from other snapshots too


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """``refs/<revision>`` = commit, written atomically (huggingface-hub's ``_cache_commit_hash_for_specific_revision``)."""
    if revision == commit:
        return
    ref = storage / "refs" / revision
    if ref.is_file() and ref.read_text() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def _download_blob(ref: ModelRef, endpoint: str, commit: str, blob: Path, etag: str, size: int | None,
                   progress: bool) -> None:
    """Download (or finish downloading) one file, check it and move it to ``blob``."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    partial = blob.with_name(blob.name + _PARTIAL_SUFFIX)
    # The commit, not the branch: bytes appended later must come from the same file. The hub
    # redirects each request to a freshly signed CDN address, so a long pull never holds an expired one.
    url = hf_hub_url(ref.repo, ref.file, revision=commit, endpoint=endpoint)
    resumed = _size(partial)
    blob.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(url, build_hf_headers(), partial, size, ref.file, progress)
    except KeyboardInterrupt:
        raise
    except _Mismatch as m:
        raise EFTError(f"cannot download {ref.file} from {ref.repo}{_rev(ref)}: {m}") from None
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming repo and file
        error = _download_error(ref, endpoint, e)
        kept = _size(partial)
        if kept:
            of = f" of {size}" if size is not None else ""
            error = EFTError(f"{error}; kept {kept}{of} bytes, run the pull again to resume")
        raise error from None
    try:
        _file_matches(partial, etag, size, check_size=True, hash_it=True)
    except _Mismatch as m:
        partial.unlink(missing_ok=True)
        how = f"; it resumed a partial download of {resumed} bytes" if resumed else ""
        raise EFTError(f"{ref.file} from {ref.repo} does not match what {endpoint} reports ({m}{how}); "
                       f"removed it, run the pull again") from None
    os.replace(partial, blob)


def _pull_hub(ref: ModelRef, cache: Path, endpoint: str, progress: bool) -> Path:
    """Download one hub file (if needed) and check it; return its snapshot path."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    cached = _cached(ref, cache)
    if hub_offline():
        if cached is not None:
            return cached
        raise EFTError(f"cannot download {ref.file} from {ref.repo}: offline mode is on (HF_HUB_OFFLINE); unset it to download")
    # Ask the hub first: the answer (commit, etag, size) names the cache entries and is what the
    # file is checked against, and a missing repo or file fails here before anything is written.
    try:
        meta = get_hf_file_metadata(hf_hub_url(ref.repo, ref.file, revision=ref.revision, endpoint=endpoint))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        if cached is not None and isinstance(e, _network_errors()):
            return cached  # the hub is unreachable; what is cached is still usable
        raise _download_error(ref, endpoint, e) from None
    commit, etag, size = meta.commit_hash, meta.etag, meta.size
    if not all(name and "/" not in name and not name.startswith(".") for name in (commit, etag)):
        raise EFTError(f"cannot download {ref.file} from {ref.repo}{_rev(ref)}: {endpoint} did not report the file's "
                       f"commit and etag (is HF_ENDPOINT a Hugging Face hub?)")
    storage = cache / _repo_folder(ref.repo)
    blob = storage / "blobs" / etag
    pointer = storage / "snapshots" / commit / ref.file
    revision = ref.revision or "main"

    # Already there: a size check only (hashing is for fresh downloads). Before taking the lock,
    # so a read-only cache that holds the file still works.
    if pointer.is_file():
        if size is None or pointer.stat().st_size == size:
            try:
                _write_ref(storage, revision, commit)
            except OSError:
                pass
            return pointer
        _remove_cached(pointer)  # damaged on disk: fetch it again

    with _blob_lock(cache, ref.repo, etag):
        new_blob = False
        # The blob may be there without this snapshot's link (another revision, or another pull
        # that finished while this one waited for the lock).
        if not (blob.is_file() and (size is None or blob.stat().st_size == size)):
            _download_blob(ref, endpoint, commit, blob, etag, size, progress)
            new_blob = True
        _link(blob, pointer, new_blob)
        _write_ref(storage, revision, commit)
    return pointer


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
