"""The large base model on llama.cpp RPC servers (ggml-rpc), and the server itself.

An RPC server (``eft-local rpc-server``) lends a machine's CPU or GPU to another process: that
process keeps some of a model's layers there, and every forward pass computes them there. With
``rpc=`` (``--rpc``) the base model's layers go to the given servers; the small models stay here.

llama.cpp ends the whole process when an RPC connection fails (GGML_ABORT in ggml-rpc.cpp:
"Failed to connect to ...", "Remote RPC server crashed or returned malformed response"), and a
model whose server has gone cannot even be freed, since freeing talks to the server. So the base
model runs in a worker process of its own (``RPCBackend``): a server that dies ends the worker and
the current reply, never the session, and the next request starts a new worker. Before a worker
starts, every server is probed with a TCP connection and the RPC handshake under a timeout, so an
unreachable or busy server is one line within seconds instead of an abort or a hang. Before each
request the worker looks for connections a server has closed meanwhile (a server stopped or
restarted between two requests) and is replaced at once. Its connections get TCP keepalive, so
a server machine that vanishes without closing them is noticed within about 30 seconds.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Iterator, Sequence

import numpy as np

from .backend import batch_chunks, check_eval, sync_cache
from .errors import EFTError, UnavailableError
from .interrupts import sigint_deferred
from .log import llama_logger

logger = logging.getLogger("eft_local.rpc")

DEFAULT_PORT = 50052
# How long a server may take to accept a connection and answer the handshake.
CONNECT_TIMEOUT = 5.0
# How long one llama_decode (at most n_batch tokens) may take before the worker is stopped;
# a dead server is noticed much sooner (its connection closes, or keepalive gives up).
DECODE_TIMEOUT_ENV = "EFT_LOCAL_RPC_TIMEOUT"
DEFAULT_DECODE_TIMEOUT = 300.0
# Keepalive on the worker's connections: first probe after 10 s idle, then every 5 s, 3 tries;
# unacknowledged data may wait 30 s. A server that is only computing still answers probes.
_KEEPALIVE = (10, 5, 3, 30_000)

# llama.cpp's RPC protocol: the HELLO command and its request (this build's 24-byte capability
# block, all zero: plain TCP).
_RPC_CMD_HELLO = 14
_HELLO = bytes([_RPC_CMD_HELLO]) + struct.pack("<Q", 24) + bytes(24)

# ggml_backend_dev_type (ggml-backend.h)
_DEV_GPU, _DEV_IGPU = 1, 2


# --- the build --------------------------------------------------------------------------------

def reinstall_hint() -> str:
    """The one command that rebuilds llama-cpp-python with RPC (pip would reuse a cached wheel)."""
    try:
        import llama_cpp

        version = f"=={llama_cpp.__version__}"
    except Exception:  # noqa: BLE001 - only the hint's version pin depends on it
        version = ""
    return ("pip cache remove llama_cpp_python; CMAKE_ARGS=\"-DGGML_RPC=on\" pip install --force-reinstall "
            f"--no-deps --no-binary llama-cpp-python \"llama-cpp-python{version}\"")


_ggml: Any = None


def _lib() -> Any:
    """libggml with the device functions typed, or None when it cannot be loaded."""
    global _ggml
    if _ggml is None:
        try:
            # llama-cpp-python's own handle on libggml (its private module, the one place that
            # knows where the library is); the ggml-base functions resolve through it.
            from llama_cpp._ggml import libggml as lib

            v, p, n, s = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
            for name, args, result in [
                ("ggml_backend_reg_by_name", [p], v),
                ("ggml_backend_reg_get_proc_address", [v, p], v),
                ("ggml_backend_reg_dev_count", [v], s),
                ("ggml_backend_reg_dev_get", [v, s], v),
                ("ggml_backend_dev_count", [], s),
                ("ggml_backend_dev_get", [s], v),
                ("ggml_backend_dev_type", [v], n),
                ("ggml_backend_dev_name", [v], p),
                ("ggml_backend_dev_description", [v], p),
            ]:
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, result
            _ggml = lib
        except (ImportError, OSError, AttributeError):
            _ggml = False
    return _ggml or None


def rpc_available() -> bool:
    """Whether the installed llama.cpp has the RPC backend (built with ``-DGGML_RPC=on``)."""
    lib = _lib()
    return bool(lib and lib.ggml_backend_reg_by_name(b"RPC"))


def require_rpc() -> None:
    """Raise EFTError, with the command that fixes it, unless llama.cpp has RPC."""
    if not rpc_available():
        raise EFTError(f"this llama-cpp-python was built without RPC; reinstall it with: {reinstall_hint()}")


def _rpc_function(name: str, prototype: Any) -> Any:
    """A function of the RPC backend, found through its registry entry as llama.cpp's tools do."""
    require_rpc()
    lib = _lib()
    address = lib.ggml_backend_reg_get_proc_address(lib.ggml_backend_reg_by_name(b"RPC"), name.encode())
    if not address:
        raise EFTError(f"this llama.cpp's RPC backend lacks {name}; reinstall it with: {reinstall_hint()}")
    return prototype(address)


# --- endpoints --------------------------------------------------------------------------------

def parse_endpoints(spec: str | Sequence[str]) -> list[str]:
    """``"host:port,host:port"`` or a list of ``"host:port"`` as a checked list of endpoints."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    endpoints: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise EFTError(f"RPC servers are given as HOST:PORT strings, got {item!r}")
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise EFTError(f"RPC server {item.strip()!r} is not HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})")
        endpoint = f"{host}:{int(port)}"
        if endpoint in endpoints:
            raise EFTError(f"RPC server {endpoint} is given twice")
        endpoints.append(endpoint)
    if not endpoints:
        raise EFTError("no RPC server given")
    return endpoints


def _address(endpoint: str) -> tuple[str, int]:
    """The IPv4 address and port of ``endpoint`` (llama.cpp's client speaks IPv4 only)."""
    host, _, port = endpoint.rpartition(":")
    try:
        return socket.gethostbyname(host), int(port)
    except OSError:
        raise EFTError(f"RPC server {endpoint}: cannot resolve {host}") from None


def probe(endpoint: str, timeout: float | None = None) -> None:
    """Raise EFTError unless ``endpoint`` accepts a connection and answers the RPC handshake
    within ``timeout`` seconds (llama.cpp itself would abort the process, or wait for ever).
    """
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    address = _address(endpoint)
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except socket.timeout:
        raise UnavailableError(f"RPC server {endpoint} is unreachable: no answer within {timeout:g} s") from None
    except OSError as e:
        raise UnavailableError(f"RPC server {endpoint} is unreachable: {e.strerror or e}") from None
    with sock:
        try:
            sock.sendall(_HELLO)
            # Any answer will do: the reply, or a close by a server of another protocol version
            # (llama.cpp then says so at the real handshake). Silence means that the server is
            # busy: it serves one client at a time.
            sock.recv(1)
        except socket.timeout:
            raise UnavailableError(f"RPC server {endpoint} does not answer within {timeout:g} s: it serves one client "
                           "at a time; is another eft-local or llama.cpp using it?") from None
        except OSError:
            pass  # it closed the connection: answered


def reachable(endpoint: str, timeout: float = 2.0) -> bool:
    """Whether ``probe`` succeeds."""
    try:
        probe(endpoint, timeout)
        return True
    except EFTError:
        return False


# --- the server -------------------------------------------------------------------------------

def server_devices() -> list[int]:
    """The devices a server lends, as llama.cpp's rpc-server picks them: every GPU, else the CPU."""
    require_rpc()
    lib = _lib()
    devices = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    gpus = [d for d in devices if lib.ggml_backend_dev_type(d) in (_DEV_GPU, _DEV_IGPU)]
    return gpus or devices[:1]


def device_names(devices: Sequence[int]) -> list[str]:
    """``name (description)`` of each device."""
    lib = _lib()
    return [f"{lib.ggml_backend_dev_name(d).decode()} ({lib.ggml_backend_dev_description(d).decode()})"
            for d in devices]


def listen_address(host: str, port: int) -> str:
    """The IPv4 address the server will listen on; EFTError when ``host:port`` cannot be bound."""
    try:
        address = socket.gethostbyname(host)
    except OSError:
        raise EFTError(f"cannot resolve {host}") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # llama.cpp binds with SO_REUSEADDR too: only a socket still listening there is a conflict.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            raise EFTError(f"cannot listen on {address}:{port}: {e.strerror or e}") from None
    return address


def start_server(address: str, port: int, *, threads: int, devices: Sequence[int],
                 cache_dir: str | None = None) -> threading.Thread:
    """Run llama.cpp's RPC server on ``address:port`` in a daemon thread and return the thread.

    llama.cpp's server call never returns while it serves; a daemon thread lets the process exit
    when the main thread decides to. The thread ends early only when the server cannot start.
    """
    start = _rpc_function("ggml_backend_rpc_start_server", ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p))
    array = (ctypes.c_void_p * len(devices))(*devices)
    args = (f"{address}:{port}".encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), array)
    thread = threading.Thread(target=start, args=args, name="rpc-server", daemon=True)
    thread.start()
    return thread


# --- the worker that runs the base model --------------------------------------------------------

# "load_tensors: RPC0[10.0.0.2:50052] model buffer size =  2.26 MiB"
_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S.*?) model buffer size =\s+([\d.]+) MiB")
# "/path/to/ggml-rpc.cpp:569: Remote RPC server crashed or returned malformed response"
_ABORT_LINE = re.compile(r"^\S*?\.(?:c|cpp|h):\d+: (.+)$")


def decode_timeout() -> float:
    """Seconds one decode may take (``EFT_LOCAL_RPC_TIMEOUT``, default 300)."""
    try:
        return max(1.0, float(os.environ.get(DECODE_TIMEOUT_ENV) or DEFAULT_DECODE_TIMEOUT))
    except ValueError:
        raise EFTError(f"{DECODE_TIMEOUT_ENV} must be a number of seconds") from None


class RPCBackend:
    """The base model with its layers on RPC servers, run by a worker process.

    It offers what the step loop uses of a ``Backend`` (eval, logits, trim, sync, reset, the
    token list, vocabulary facts). When the worker ends (a server went away), the running call
    raises EFTError naming the server and the cache is empty; the next call starts a new worker,
    which loads the model again, or says in one line that a server is unreachable.
    """

    def __init__(self, path: str | os.PathLike, endpoints: Sequence[str], *, n_ctx: int = 4096,
                 n_batch: int = 512, n_threads: int | None = None, n_gpu_layers: int = -1):
        """Probe ``endpoints``, start the worker and load the model; ``n_gpu_layers`` layers
        (-1: all, the output layer too) go to the servers, split by their free memory."""
        require_rpc()
        self.path = os.fspath(path)
        self.endpoints = list(endpoints)
        self._spec = dict(path=self.path, endpoints=self.endpoints, n_ctx=n_ctx, n_batch=n_batch,
                          n_threads=n_threads or os.cpu_count() or 1, n_gpu_layers=n_gpu_layers)
        self.tokens: list[int] = []
        self.n_evaluated = 0
        self.n_decode_calls = 0
        self.placement: dict[str, float] = {}  # MiB of model weights per llama.cpp buffer
        self._rows: np.ndarray | None = None
        self._pieces: dict[int, bytes] = {}
        self._texts: dict[int, str] = {}
        self._eog: dict[int, bool] = {}
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._send_conn: Connection | None = None
        self._recv_conn: Connection | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=40)
        self._counts = (0, 0)  # the worker's own n_evaluated, n_decode_calls
        self._closed = False
        self._start()

    # --- the worker's life ---------------------------------------------------------------------

    def _start(self) -> None:
        """Probe every server, start a worker and wait until it has loaded the model."""
        for endpoint in self.endpoints:
            probe(endpoint)
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        # This very eft_local, whatever the folder (-P: not one found there).
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (f"import sys; sys.path.insert(0, {root!r}); from eft_local.rpc import _worker; "
                f"sys.path.remove({root!r}); _worker({p2c_r}, {c2p_w})")
        env = dict(os.environ, GGML_NO_BACKTRACE="1")  # an abort's gdb backtrace says nothing here
        try:
            # Its own session: a Ctrl-C at the terminal is this process's to handle.
            self._proc = subprocess.Popen(
                [sys.executable, "-P", "-c", code], pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            for fd in (p2c_w, c2p_r):
                os.close(fd)
            raise EFTError(f"cannot start the process that runs {self.path}: {e}") from None
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        self._send_conn = Connection(p2c_w, readable=False)
        self._recv_conn = Connection(c2p_r, writable=False)
        self._log.clear()
        self._counts = (0, 0)
        self._reader = threading.Thread(target=self._read_log, args=(self._proc.stdout,), daemon=True,
                                        name="rpc-worker-log")
        self._reader.start()
        try:
            self._send_conn.send(self._spec)
            facts = self._receive(None, "loading")
        except BaseException:
            self._stop()
            raise
        self.n_vocab, self.n_ctx, self.n_batch = facts["n_vocab"], facts["n_ctx"], facts["n_batch"]
        self.bos_id, self.eos_id = facts["bos_id"], facts["eos_id"]
        self.placement = facts["placement"]
        logger.info("%s: %s", os.path.basename(self.path), ", ".join(
            f"{mib:.2f} MiB on {name[name.find('[') + 1:-1] if '[' in name else 'this machine'}"
            for name, mib in self.placement.items()))

    def _read_log(self, stream: Any) -> None:
        """Keep the worker's last output lines (llama.cpp's log, an abort's reason) and pass them
        on to the llama.cpp logger, which shows them with --verbose."""
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self._log.append(line)
                if llama_logger.isEnabledFor(logging.INFO):
                    llama_logger.info(line)
        stream.close()

    def _stop(self) -> None:
        """Stop the worker now; its cache is gone."""
        proc, self._proc = self._proc, None
        for conn in (self._send_conn, self._recv_conn):
            if conn is not None:
                conn.close()
        self._send_conn = self._recv_conn = None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.tokens.clear()
        self._rows = None

    def _receive(self, timeout: float | None, doing: str) -> Any:
        """The worker's reply; EFTError when it ends or takes longer than ``timeout``."""
        conn = self._recv_conn
        try:
            if not conn.poll(timeout):
                raise TimeoutError
            reply = conn.recv()
        except TimeoutError:
            self._stop()
            raise UnavailableError(f"the RPC servers {', '.join(self.endpoints)} did not finish {doing} within "
                           f"{timeout:g} s ({DECODE_TIMEOUT_ENV}); the next request reconnects") from None
        except (EOFError, OSError):
            raise self._lost(doing) from None
        if reply[0] == "ok":
            return reply[1]
        kind, message = reply[1], reply[2]
        if doing == "loading":  # a worker that could not load the model has ended
            self._stop()
        raise {"ValueError": ValueError, "IndexError": IndexError}.get(kind, EFTError)(message)

    def _lost(self, doing: str) -> EFTError:
        """The error for a worker that ended while ``doing``: which server went away, and why."""
        code = None
        try:
            code = self._proc.wait(timeout=5)
            self._reader.join(timeout=2)  # its last lines hold llama.cpp's reason
        except subprocess.TimeoutExpired:
            pass
        reasons = [m.group(1).strip() for m in map(_ABORT_LINE.match, self._log) if m]
        reason = f" (llama.cpp: {reasons[-1]})" if reasons else f" (exit status {code})" if code else ""
        self._stop()
        gone = [e for e in self.endpoints if not reachable(e)]
        if doing == "loading":
            where = f"RPC server {', '.join(gone)} went away" if gone else "the worker process ended"
            return UnavailableError(f"cannot load {self.path} on the RPC servers {', '.join(self.endpoints)}: {where}{reason}")
        if gone:
            return UnavailableError(f"RPC server {', '.join(gone)} went away while {doing}{reason}; "
                            "the next request reconnects")
        return UnavailableError(f"the process running {os.path.basename(self.path)} on RPC servers ended while {doing}"
                        f"{reason}; the next request starts it again")

    def _call(self, op: str, *args: Any, timeout: float | None = None, doing: str = "decoding") -> Any:
        """Run ``op`` in the worker (starting one first if the last has ended) and return its result."""
        with self._lock:
            if self._closed:
                raise EFTError("this model is closed")
            if self._proc is None:
                self._start()
            # Ctrl-C waits for the reply, so this list and the worker's cache stay in step.
            with sigint_deferred():
                try:
                    self._send_conn.send((op, args))
                except OSError:
                    raise self._lost(doing) from None
                result, counts = self._receive(timeout, doing)
            (n_eval, n_calls), (old_eval, old_calls) = counts, self._counts
            self.n_evaluated += n_eval - old_eval
            self.n_decode_calls += n_calls - old_calls
            self._counts = counts
            return result

    def close(self) -> None:
        """Stop the worker; it frees the model on the servers first when they are still there."""
        with self._lock:
            self._closed = True
            if self._proc is not None:
                try:
                    self._send_conn.send(("close", ()))
                    self._proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                self._stop()

    # --- the cache -----------------------------------------------------------------------------

    def eval(self, tokens: Sequence[int], *, n_logits: int = 1) -> None:
        """Append ``tokens`` to the cache; keep logits for the last ``n_logits`` of them.

        One worker call per n_batch chunk, so the decode timeout bounds one llama_decode.
        """
        tokens = [int(t) for t in tokens]
        check_eval(self, tokens, n_logits)
        timeout = decode_timeout()
        for start, end in batch_chunks(len(tokens), self.n_batch):
            chunk = tokens[start:end]
            n_rows = n_logits if end >= len(tokens) else 1
            self._rows = None
            rows = self._call("eval", chunk, n_rows, timeout=timeout)
            self.tokens.extend(chunk)
            self._rows = np.frombuffer(rows, dtype=np.float32).reshape(n_rows, self.n_vocab)

    def logits(self, i: int = -1) -> np.ndarray:
        """Raw logits of output row ``i`` of the last eval (-1: the last token)."""
        rows = self._rows
        n = 0 if rows is None else len(rows)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"logits row {i} not available ({n} rows)")
        return rows[i]

    def trim(self, n: int) -> None:
        """Keep only the first ``n`` tokens in the cache."""
        if n >= len(self.tokens):
            return
        self._rows = None
        self._call("trim", n, timeout=decode_timeout())
        del self.tokens[n:]

    def sync(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly ``tokens``, with logits for the last one; returns how many
        tokens were evaluated."""
        if not tokens:
            raise ValueError("cannot evaluate an empty prompt")
        self._reconnect_if_closed()
        return sync_cache(self, tokens)

    def _reconnect_if_closed(self) -> None:
        """Before a request: replace a worker whose server closed its connection since the last
        one (a server stopped or restarted in between), instead of failing at the next decode."""
        with self._lock:
            if self._proc is not None:
                gone = self._call("closed", doing="checking the connections")
                if gone:
                    logger.info("RPC server %s closed its connection; reconnecting", ", ".join(gone))
                    self._stop()

    def reset(self) -> None:
        """Forget the whole cache."""
        with self._lock:
            if self._proc is not None:
                self._call("reset")
            self.tokens.clear()
            self._rows = None

    # --- vocabulary ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokenize like llama.cpp: ``add_bos`` follows the model's own BOS rule when True."""
        return self._call("tokenize", text, add_bos, special, doing="tokenizing")

    def piece(self, token: int) -> bytes:
        """The bytes a token decodes to (special tokens render as nothing)."""
        if token not in self._pieces:
            self._pieces[token] = self._call("piece", token, doing="reading the vocabulary")
        return self._pieces[token]

    def token_text(self, token: int) -> str:
        """The token's vocabulary entry, special tokens included."""
        if token not in self._texts:
            self._texts[token] = self._call("token_text", token, doing="reading the vocabulary")
        return self._texts[token]

    def is_eog(self, token: int) -> bool:
        """True for the model's end-of-generation tokens."""
        if token not in self._eog:
            self._eog[token] = self._call("is_eog", token, doing="reading the vocabulary")
        return self._eog[token]

    def sockets(self) -> int:
        """How many of the worker's connections to the servers have keepalive (for tests)."""
        return self._call("sockets", doing="asking the worker")


# --- inside the worker ------------------------------------------------------------------------

def _rpc_devices(endpoints: Sequence[str]) -> list[int]:
    """The ggml devices of ``endpoints``, in order. They are not registered with ggml, so no
    other model would ever use them."""
    add = _rpc_function("ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    lib = _lib()
    devices = []
    for endpoint in endpoints:
        reg = add(endpoint.encode())
        if not reg or not lib.ggml_backend_reg_dev_count(reg):
            raise EFTError(f"RPC server {endpoint} offers no device")
        devices += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
    return devices


class _Connections(threading.Thread):
    """This process's connections to the servers, as llama.cpp opens them. Each gets TCP
    keepalive (llama.cpp sets none, so a vanished server would leave a decode waiting for ever);
    ``closed`` says which ones a server has closed."""

    def __init__(self, endpoints: Sequence[str]):
        super().__init__(daemon=True, name="rpc-keepalive")
        self.peers = {_address(e): e for e in endpoints}
        self.tuned: set[str] = set()

    def run(self) -> None:
        while True:
            self.scan()
            time.sleep(0.5)

    def _each(self) -> Iterator[tuple[str, socket.socket, str]]:
        """(fd link, a duplicate of the socket, endpoint) of each open connection to a server.

        Options set on a duplicate apply to the same connection; closing it does not close it.
        """
        fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
        for name in os.listdir(fd_dir):
            try:
                link = os.readlink(os.path.join(fd_dir, name))
            except OSError:
                link = name
            if link.startswith("/") or link.startswith("pipe:"):
                continue
            try:
                s = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
            except (OSError, ValueError):
                continue
            with s:
                try:
                    endpoint = self.peers.get(s.getpeername())
                except OSError:
                    continue
                if endpoint is not None:
                    yield link, s, endpoint

    def scan(self) -> int:
        """Tune the connections not yet tuned; return how many are open now."""
        n_open = 0
        for link, s, _ in self._each():
            try:
                if link not in self.tuned:
                    _set_keepalive(s)
                    self.tuned.add(link)
                n_open += bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
            except OSError:
                continue
        return n_open

    def closed(self) -> list[str]:
        """The endpoints whose server has closed (or keepalive has given up) a connection.

        Between two calls a connection has nothing to read, so a peek that finds its end means
        the server has gone; llama.cpp would abort at its next command.
        """
        gone = []
        for _, s, endpoint in self._each():
            try:
                if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    gone.append(endpoint)
            except BlockingIOError:
                pass
            except OSError:
                gone.append(endpoint)
        return gone


def _set_keepalive(s: socket.socket) -> None:
    idle, interval, count, user_timeout = _KEEPALIVE
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in [("TCP_KEEPIDLE", idle), ("TCP_KEEPALIVE", idle), ("TCP_KEEPINTVL", interval),
                          ("TCP_KEEPCNT", count), ("TCP_USER_TIMEOUT", user_timeout)]:
        if hasattr(socket, option):
            s.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class _Placement(logging.Handler):
    """Collects llama.cpp's "model buffer size" lines while the worker loads the model."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.buffers: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = _BUFFER_LINE.search(record.getMessage())
        if m:
            self.buffers[m.group(1).strip()] = self.buffers.get(m.group(1).strip(), 0.0) + float(m.group(2))


def _worker(read_fd: int, write_fd: int) -> None:
    """Load the model the parent asks for onto its servers, then answer its calls until it
    says close or goes away."""
    from .backend import Backend

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    # llama.cpp's log goes to this process's output, which the parent reads; at INFO, since
    # llama-cpp-python would otherwise send stderr (and an abort's reason) to /dev/null.
    llama_logger.setLevel(logging.INFO)
    llama_logger.propagate = False
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    placement = _Placement()
    llama_logger.addHandler(out)
    llama_logger.addHandler(placement)
    spec = inbox.recv()
    connections = _Connections(spec["endpoints"])
    connections.start()
    try:
        model = Backend(spec["path"], n_ctx=spec["n_ctx"], n_batch=spec["n_batch"], n_threads=spec["n_threads"],
                        n_gpu_layers=spec["n_gpu_layers"], devices=_rpc_devices(spec["endpoints"]))
    except EFTError as e:
        outbox.send(("error", "EFTError", str(e)))
        return
    llama_logger.removeHandler(placement)
    connections.scan()
    facts = dict(n_vocab=model.n_vocab, n_ctx=model.n_ctx, n_batch=model.n_batch, bos_id=model.bos_id,
                 eos_id=model.eos_id, placement=placement.buffers)
    outbox.send(("ok", facts))

    def evaluate(tokens: list[int], n_logits: int) -> bytes:
        model.eval(tokens, n_logits=n_logits)
        return np.stack([model.logits(i) for i in range(n_logits)]).astype(np.float32).tobytes()

    ops = {
        "eval": evaluate,
        "trim": model.trim,
        "reset": model.reset,
        "tokenize": lambda text, add_bos, special: model.tokenize(text, add_bos=add_bos, special=special),
        "piece": model.piece,
        "token_text": model.token_text,
        "is_eog": model.is_eog,
        "sockets": connections.scan,
        "closed": connections.closed,
    }
    while True:
        try:
            op, args = inbox.recv()
        except (EOFError, OSError):
            break  # the parent has gone
        if op == "close":
            break
        try:
            result = ops[op](*args)
            reply: tuple = ("ok", (result, (model.n_evaluated, model.n_decode_calls)))
        except (EFTError, ValueError, IndexError) as e:
            result, reply = None, ("error", type(e).__name__, str(e))
        try:
            outbox.send(reply)
        except OSError:
            break
        if op == "closed" and result:
            # Freeing the model would talk to the server that has gone, and llama.cpp would abort.
            os._exit(0)
    model.close()
