"""Whether this process can listen on an address: checked before anything slow starts."""

from __future__ import annotations

import socket

from .errors import EFTError


def listen_address(host: str, port: int, *, ipv4: bool = False) -> str:
    """The address ``host`` resolves to (IPv4 only with ``ipv4``), once a socket could bind it
    with ``port``; EFTError in one line when it cannot."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, socket.AF_INET if ipv4 else 0,
                                                      socket.SOCK_STREAM)[0]
    except (OSError, IndexError):
        raise EFTError(f"cannot resolve {host}") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # Servers bind with SO_REUSEADDR too: only a socket still listening there is a conflict.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise EFTError(f"cannot listen on {address[0]}:{port}: {e.strerror or e}") from None
    return address[0]
