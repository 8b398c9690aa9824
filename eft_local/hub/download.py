"""Hub files into huggingface-hub's cache, with downloads that resume across calls.

huggingface-hub 2.x starts a failed download over. Here the bytes go to ``blobs/<etag>.incomplete`` (``hf cache
scan`` lists it, ``hf cache prune`` deletes it) and the next call asks for the rest with ``Range``; ``http_get``
writes in 10 MB pieces, so a dropped connection loses at most the piece in flight. The whole file is checked
against the hub's size and sha256 and renamed to ``blobs/<etag>``, where ``hf_hub_download`` links it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from ..core.errors import EFTError

_RETRIES = 3  # tries in a row that bring no new bytes (busy server, dropped connection) before giving up
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class HubUnreachable(EFTError):
    """The hub did not answer; a copy already in the cache is still usable."""


def download(repo: str, file: str, revision: str | None, *, cache: Path, endpoint: str, progress: bool = True) -> Path:
    """Download ``file`` into ``cache`` unless it is there with the hub's size; return its snapshot path."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import WeakFileLock

    where = f"{file} from {repo}" + (f" (revision {revision})" if revision else "")
    partial, size = None, 0
    try:
        # Commit, etag and size name the cache entries and are what the file is checked against.
        meta = get_hf_file_metadata(hf_hub_url(repo, file, revision=revision, endpoint=endpoint))
        commit, etag, size = meta.commit_hash, meta.etag, meta.size
        if size is None or not all(name and "/" not in name and name[0] != "." for name in (commit, etag)):
            raise EFTError(f"cannot download {where}: {endpoint} did not report the file's commit, etag and size "
                           f"(is HF_ENDPOINT a Hugging Face hub?)")
        storage = cache / ("models--" + repo.replace("/", "--"))
        blob, pointer = storage / "blobs" / etag, storage / "snapshots" / commit / file
        # Files already there get a size check only (hashing 40 GB takes 20-40 s); a damaged one is fetched again.
        if pointer.is_file() and pointer.stat().st_size != size:
            if pointer.is_symlink():  # a copy (links off) says nothing about the blob
                blob.unlink(missing_ok=True)
            pointer.unlink()
        if not pointer.is_file() and _size(blob) != size:
            lock = cache / ".locks" / storage.name / f"{etag}.lock"
            partial = blob.with_name(blob.name + ".incomplete")
            for folder in (lock.parent, partial.parent):
                folder.mkdir(parents=True, exist_ok=True)
            with WeakFileLock(lock):  # the lock hf_hub_download takes too: one writer per partial file
                if _size(blob) != size:  # another pull may have finished it while this one waited
                    if _size(partial) > size:  # longer than the file: not a prefix of it
                        partial.unlink()
                    resumed = _size(partial)
                    # The commit, not the branch: bytes appended later must come from the same file.
                    _fetch(hf_hub_url(repo, file, revision=commit, endpoint=endpoint), partial, size, file, progress)
                    _check(partial, etag, size, resumed, where=where, endpoint=endpoint)
                    partial.replace(blob)
        found = hf_hub_download(repo, file, revision=revision, cache_dir=cache, endpoint=endpoint)
    except EFTError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming repo and file
        error, kept = _error(where, endpoint, revision, e), _size(partial) if partial else 0
        tail = f"; kept {kept} of {size} bytes, run the pull again to resume"
        raise (EFTError(f"{error}{tail}") if kept else error) from None
    if partial and not pointer.is_symlink():
        blob.unlink(missing_ok=True)  # links off: the snapshot got a copy, where huggingface-hub moves a new blob
    # Our own spelling of the path: huggingface-hub resolves the cache folder, resolve() does not.
    return pointer if pointer.is_file() else Path(found)


def _fetch(url: str, partial: Path, size: int, desc: str, progress: bool) -> None:
    """Append to ``partial`` the bytes it lacks, asking again after a busy server or a dropped connection."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    misses = 0
    with _progress_bar(desc, size, _size(partial), progress) as bar:
        while (have := _size(partial)) != size:
            bar.update(have - bar.n)
            try:
                with open(partial, "ab") as f:
                    # No expected_size: a complete answer of another length is for _check, not a retry.
                    http_get(url, f, resume_size=have, headers=build_hf_headers(), _tqdm_bar=bar)
                return
            except Exception as e:  # noqa: BLE001 - KeyboardInterrupt passes; the partial file stays either way
                if _status(e) == 416 and have:  # the server's file is shorter than the partial one
                    partial.unlink()
                    continue
                misses = 0 if _size(partial) > have else misses + 1
                if misses >= _RETRIES or not (_status(e) in _RETRY_STATUS or _network(e)):
                    raise
                time.sleep(2.0 ** misses / 2)  # 0.5 s after a try that brought bytes, then 1 s, 2 s


def _progress_bar(desc: str, total: int, initial: int, enabled: bool) -> Any:
    """huggingface-hub's tqdm, so ``HF_HUB_DISABLE_PROGRESS_BARS`` applies; none off a terminal."""
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, disable=None if enabled else True)


def _check(partial: Path, etag: str, size: int, resumed: int, *, where: str, endpoint: str) -> None:
    """Remove ``partial`` and raise unless it has the hub's size and the content its etag names."""
    if (have := _size(partial)) != size:  # a complete answer of another length: the server has another file
        partial.unlink()
        raise EFTError(f"cannot download {where}: the server offers {have} bytes, the hub reports size {size}")
    if len(etag) not in (40, 64) or etag.strip("0123456789abcdef"):
        return  # not a content hash
    h = hashlib.sha256() if len(etag) == 64 else hashlib.sha1(b"blob %d\0" % have)  # git's blob id
    with open(partial, "rb") as f:
        digest = hashlib.file_digest(f, lambda: h).hexdigest()
    if digest != etag:
        partial.unlink()
        how = f"; it resumed a partial download of {resumed} bytes" if resumed else ""
        raise EFTError(f"{where} does not match what {endpoint} reports (content hash {digest[:12]}..., "
                       f"the hub reports {etag[:12]}...{how}); removed it, run the pull again")


def _error(where: str, endpoint: str, revision: str | None, e: BaseException) -> EFTError:
    """One line that names the repo and file and says what went wrong."""
    from huggingface_hub import utils as hfu

    line = next((text.strip() for text in str(e).splitlines() if text.strip()), type(e).__name__)
    if _network(e):
        return HubUnreachable(f"cannot download {where}: cannot reach {endpoint} ({line})")
    gated = "the repository is gated: accept its licence on the hub and log in (hf auth login, or set HF_TOKEN)"
    whys = ((hfu.GatedRepoError, gated), (hfu.RepositoryNotFoundError, "repository not found (or private)"),
            (hfu.RevisionNotFoundError, f"revision {revision or 'main'!r} not found"),
            (hfu.LocalEntryNotFoundError, f"cannot reach {endpoint}"),
            (hfu.EntryNotFoundError, "file not found in the repository"),
            (hfu.HfHubHTTPError, f"HTTP {_status(e)}: {line}"),
            (OSError, line), (BaseException, f"{type(e).__name__}: {line}"))  # the first fit: subclasses first
    return EFTError(f"cannot download {where}: {next(text for kind, text in whys if isinstance(e, kind))}")


def _status(e: BaseException) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


def _network(e: BaseException) -> bool:
    """True for "could not talk to the server": httpx's errors (huggingface-hub 1.x) or httpx2's (2.x)."""
    return isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in {"httpx", "httpx2"}


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
