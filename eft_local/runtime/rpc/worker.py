"""Inside the worker process that runs the base model on RPC servers (``client.RPCBackend``).

llama.cpp aborts the process when an RPC connection fails, so the model lives here, apart from
the session: the parent sends calls over a pipe and this process answers them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Iterator, Sequence

import numpy as np

from ...core.errors import EFTError
from ..context import LocalBackend
from ..log import llama_logger
from .endpoints import address
from ..ggml import ggml
from .build import rpc_function

# Keepalive on the worker's connections: first probe after 10 s idle, then every 5 s, 3 tries;
# unacknowledged data may wait 30 s. A server that is only computing still answers probes.
_KEEPALIVE = (10, 5, 3, 30_000)
# "load_tensors: RPC0[10.0.0.2:50052] model buffer size =  2.26 MiB"
_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S.*?) model buffer size =\s+([\d.]+) MiB")


def _rpc_devices(endpoints: Sequence[str]) -> list[int]:
    """The ggml devices of ``endpoints``, in order. They are not registered with ggml, so no
    other model would ever use them."""
    add = rpc_function("ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    lib = ggml()
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
        self.peers = {address(e): e for e in endpoints}
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


def main(read_fd: int, write_fd: int) -> None:
    """Load the model the parent asks for onto its servers, then answer its calls until it
    says close or goes away."""
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
        model = LocalBackend(spec["path"], n_ctx=spec["n_ctx"], n_batch=spec["n_batch"], n_threads=spec["n_threads"],
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
