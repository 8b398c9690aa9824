"""The RPC backend of the installed llama.cpp: whether it is there, and its functions."""

from __future__ import annotations

from typing import Any

import llama_cpp

from ...core.errors import EFTError
from ..ggml import ggml


def reinstall_hint() -> str:
    """The one command that rebuilds llama-cpp-python with RPC (pip would reuse a cached wheel)."""
    return ("pip cache remove llama_cpp_python; CMAKE_ARGS=\"-DGGML_RPC=on\" pip install --force-reinstall "
            f"--no-deps --no-binary llama-cpp-python \"llama-cpp-python=={llama_cpp.__version__}\"")


def rpc_available() -> bool:
    """Whether the installed llama.cpp has the RPC backend (built with ``-DGGML_RPC=on``)."""
    lib = ggml()
    return bool(lib and lib.ggml_backend_reg_by_name(b"RPC"))


def require_rpc() -> None:
    """Raise EFTError, with the command that fixes it, unless llama.cpp has RPC."""
    if not rpc_available():
        raise EFTError(f"this llama-cpp-python was built without RPC; reinstall it with: {reinstall_hint()}")


def rpc_function(name: str, prototype: Any) -> Any:
    """A function of the RPC backend, found through its registry entry as llama.cpp's tools do."""
    require_rpc()
    lib = ggml()
    address = lib.ggml_backend_reg_get_proc_address(lib.ggml_backend_reg_by_name(b"RPC"), name.encode())
    if not address:
        raise EFTError(f"this llama.cpp's RPC backend lacks {name}; reinstall it with: {reinstall_hint()}")
    return prototype(address)
