"""``eft-local rpc-server``'s engine: llama.cpp's RPC server over this machine's devices."""

from __future__ import annotations

import ctypes
import threading
from typing import Sequence

from ..ggml import devices, gpu_devices
from .build import require_rpc, rpc_function


def server_devices() -> list[int]:
    """The devices a server lends, as llama.cpp's rpc-server picks them: every GPU, else the CPU."""
    require_rpc()
    return gpu_devices() or devices()[:1]


def start_server(address: str, port: int, *, threads: int, devices: Sequence[int],
                 cache_dir: str | None = None) -> threading.Thread:
    """Run llama.cpp's RPC server on ``address:port`` in a daemon thread and return the thread.

    llama.cpp's server call never returns while it serves; a daemon thread lets the process exit
    when the main thread decides to. The thread ends early only when the server cannot start.
    """
    start = rpc_function("ggml_backend_rpc_start_server", ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p))
    array = (ctypes.c_void_p * len(devices))(*devices)
    args = (f"{address}:{port}".encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), array)
    thread = threading.Thread(target=start, args=args, name="rpc-server", daemon=True)
    thread.start()
    return thread
