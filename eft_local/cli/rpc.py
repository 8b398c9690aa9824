"""``eft-local rpc-server``: lend this machine to another's ``--rpc``."""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from ..core.net import listen_address
from ..runtime import rpc
from .common import handle_errors, verbose_option

SECURITY = ("the RPC protocol has no authentication or encryption: anyone who can reach this port can compute "
            "on this machine and read what it holds, and anyone on the way can read the traffic. Use it on a "
            "trusted network or through an SSH tunnel.")


def default_threads() -> int:
    """Half the cores, as llama.cpp's rpc-server (the other half for the machine's own work)."""
    return max(1, (os.cpu_count() or 1) // 2)


@click.command("rpc-server")
@click.option("--host", "-H", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; see the warning it prints).")
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=rpc.DEFAULT_PORT, show_default=True,
              help="Port to listen on.")
@click.option("--threads", "-t", type=click.IntRange(1, 512), default=None,
              help="CPU threads for the CPU device [default: half the cores].")
@click.option("--cache", is_flag=True,
              help="Keep received tensors in llama.cpp's cache folder, so a client that loads the same model "
                   "again sends only their hashes.")
@verbose_option
@handle_errors
def rpc_server(host: str, port: int, threads: int | None, cache: bool) -> None:
    """Lend this machine's GPU (or else its CPU) to eft-local on another machine.

    Clients name it with --rpc HOST:PORT; it serves one client at a time and stops on Ctrl-C.
    """
    rpc.require_rpc()
    address = listen_address(host, port, ipv4=True)  # llama.cpp's server speaks IPv4 only
    devices = rpc.server_devices()
    cache_dir = _cache_dir() if cache else None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server = rpc.start_server(address, port, threads=threads or default_threads(), devices=devices,
                              cache_dir=cache_dir)
    click.echo(f"eft-local rpc-server: lending {', '.join(rpc.device_names(devices))} on {address}:{port}"
               f"{f' (tensor cache: {cache_dir})' if cache_dir else ''}; Ctrl-C stops it", err=True)
    click.echo(f"warning: {SECURITY}", err=True)
    if address != "127.0.0.1":
        click.echo(f"warning: listening on {address}, not 127.0.0.1: never expose this port to an open network",
                   err=True)
    # The main thread only waits, so a signal is handled at once; llama.cpp's server call in the
    # other thread never returns, so the process ends without waiting for it.
    while not stop.wait(0.2):
        if not server.is_alive():
            click.echo(f"error: the RPC server on {address}:{port} stopped; llama.cpp's reason is above "
                       "(-v shows its whole log)", err=True)
            _exit(1)
    click.echo("eft-local rpc-server: stopped", err=True)
    _exit(0)


def _cache_dir() -> str:
    """llama.cpp's own cache folder for RPC tensors (``$LLAMA_CACHE/rpc`` or ``~/.cache/llama.cpp/rpc``)."""
    root = os.environ.get("LLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llama.cpp")
    path = os.path.join(root, "rpc")
    os.makedirs(path, exist_ok=True)
    return path


def _exit(code: int) -> None:
    """Exit now: interpreter shutdown would tear down llama.cpp while its server thread runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

