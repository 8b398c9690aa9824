"""RPC servers as ``host:port``: parsing, probing under a timeout, and the address to listen on."""

from __future__ import annotations

import socket
import struct
from typing import Sequence

from ...core.errors import EFTError, UnavailableError

DEFAULT_PORT = 50052
# How long a server may take to accept a connection and answer the handshake.
CONNECT_TIMEOUT = 5.0

# llama.cpp's RPC protocol: the HELLO command and its request (this build's 24-byte capability
# block, all zero: plain TCP).
_RPC_CMD_HELLO = 14
_HELLO = bytes([_RPC_CMD_HELLO]) + struct.pack("<Q", 24) + bytes(24)


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


def address(endpoint: str) -> tuple[str, int]:
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
    where = address(endpoint)
    try:
        sock = socket.create_connection(where, timeout=timeout)
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
