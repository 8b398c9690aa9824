"""A stand-in for the Hugging Face hub's file endpoints, on 127.0.0.1, for download tests.

It answers what ``eft-local pull`` and ``hf_hub_download`` ask: HEAD and GET on
``/{repo_id}/resolve/{revision}/{file}`` with ``X-Repo-Commit``, ``ETag`` (plus ``X-Linked-Etag`` /
``X-Linked-Size`` for LFS files), ``Content-Length``, ``Range`` requests (206, or 416 past the end)
and the hub's ``X-Error-Code`` on errors. It never sends Xet headers. Faults can be injected per
file: dropped connections, error answers, wrong content, ignored ``Range``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class HostedFile:
    data: bytes
    lfs: bool = True
    # Fault: the next GETs close the connection after this many body bytes each (one per GET).
    drops: list[int] = field(default_factory=list)
    served: bytes | None = None  # what GET sends instead of ``data`` (HEAD still describes ``data``)
    honours_range: bool = True  # False: GET always answers 200 with the whole body, as some proxies do
    # Fault: the next GETs answer with these codes, one per GET (None: answer normally).
    statuses: list[int | None] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class StandInHub:
    """Holds repos and files, records every request, serves them on a random free port."""

    files: dict[tuple[str, str], HostedFile] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    gated: set[str] = field(default_factory=set)  # repos that answer 403 GatedRepo

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, repo: str, filename: str, data: bytes, *, lfs: bool = True) -> HostedFile:
        self.commits.setdefault(repo, secrets.token_hex(20))
        hosted = HostedFile(data=data, lfs=lfs)
        self.files[(repo, filename)] = hosted
        return hosted

    def file_requests(self) -> list[Request]:
        """Requests for files (huggingface-hub 2.x also asks ``/api/...`` on its own)."""
        with self._lock:
            return [r for r in self.requests if "/resolve/" in r.path]

    def gets(self, filename: str | None = None) -> list[Request]:
        return [r for r in self.file_requests() if r.method == "GET" and (filename is None or r.path.endswith("/" + filename))]

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "StandInHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "StandInHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-answer (an interrupted pull) is expected here, not a failure.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    hub: StandInHub
    protocol_version = "HTTP/1.1"
    timeout = 5  # bounds every read on a connection the client leaves open

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _error(self, status: int, code: str | None, repo: str | None = None) -> None:
        body = b'{"error": "stand-in hub: not found"}'
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", f"{code} (stand-in hub)")
        if repo and repo in self.hub.commits:
            self.send_header("X-Repo-Commit", self.hub.commits[repo])
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _answer(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub._lock:
            self.hub.requests.append(Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        m = _RESOLVE.match(path)
        if not m:
            return self._error(404, None)
        repo, filename = m["repo"], m["file"]
        if repo not in self.hub.commits:
            # The hub answers 401 for repos it will not show an anonymous user.
            return self._error(401, "RepoNotFound")
        if repo in self.hub.gated:
            return self._error(403, "GatedRepo", repo)
        if m["rev"] not in ("main", self.hub.commits[repo]):
            return self._error(404, "RevisionNotFound", repo)
        hosted = self.hub.files.get((repo, filename))
        if hosted is None:
            return self._error(404, "EntryNotFound", repo)

        if not head:
            with self.hub._lock:
                status = hosted.statuses.pop(0) if hosted.statuses else None
            if status is not None:
                return self._error(status, None, repo)
        body = hosted.data if head or hosted.served is None else hosted.served
        start = 0
        rng = self.headers.get("Range")
        if rng and not head and hosted.honours_range:
            rm = _RANGE.match(rng.strip())
            if rm:
                start = int(rm[1])
        if start and start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = 206 if start else 200
        self.send_response(status)
        self.send_header("X-Repo-Commit", self.hub.commits[repo])
        if hosted.lfs:
            self.send_header("ETag", f'"{hosted.git_oid}"')
            self.send_header("X-Linked-Etag", f'"{hosted.sha256}"')
            self.send_header("X-Linked-Size", str(len(hosted.data)))
        else:
            self.send_header("ETag", f'"{hosted.git_oid}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if head:
            return
        chunk = body[start:]
        with self.hub._lock:
            drop = hosted.drops.pop(0) if hosted.drops else None
        if drop is None:
            self.wfile.write(chunk)
            return
        # Send part of the body, then cut the connection as a failing network would.
        self.wfile.write(chunk[:drop])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def closed_port() -> int:
    """A local port nothing listens on (for "network down" tests)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
