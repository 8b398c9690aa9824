"""The large base model on llama.cpp RPC servers (ggml-rpc): the process-side proxy.

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
import logging
import os
import re
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Sequence

import numpy as np

from ...core.errors import EFTError, UnavailableError
from ...core.interrupts import sigint_deferred
from .. import backend as rules
from ..backend import batch_chunks, check_eval
from ..log import llama_logger
from .endpoints import probe, reachable
from .build import require_rpc

logger = logging.getLogger("eft_local.rpc")

# How long one llama_decode (at most n_batch tokens) may take before the worker is stopped;
# a dead server is noticed much sooner (its connection closes, or keepalive gives up).
DECODE_TIMEOUT_ENV = "EFT_LOCAL_RPC_TIMEOUT"
DEFAULT_DECODE_TIMEOUT = 300.0

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
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        code = (f"import sys; sys.path.insert(0, {root!r}); from eft_local.runtime.rpc.worker import main; "
                f"sys.path.remove({root!r}); main({p2c_r}, {c2p_w})")
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
        return rules.sync(self, tokens)

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
