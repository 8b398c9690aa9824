"""The RPC backend of the installed llama.cpp: whether it is there, and its functions.

llama-cpp-python binds llama.cpp's own API but not ggml's device and RPC functions; they are
looked up in the ggml library it ships, as llama.cpp's own tools find them.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys
from typing import Any

import llama_cpp

from ...core.errors import EFTError

# ggml_backend_dev_type (ggml-backend.h)
DEV_GPU, DEV_IGPU = 1, 2


def reinstall_hint() -> str:
    """The one command that rebuilds llama-cpp-python with RPC (pip would reuse a cached wheel)."""
    return ("pip cache remove llama_cpp_python; CMAKE_ARGS=\"-DGGML_RPC=on\" pip install --force-reinstall "
            f"--no-deps --no-binary llama-cpp-python \"llama-cpp-python=={llama_cpp.__version__}\"")


_ggml: Any = None


def _library() -> ctypes.CDLL:
    """The ggml library llama-cpp-python loaded (the same file: loading it again returns that
    handle); the ggml-base functions resolve through it, a dependency of it."""
    folder = pathlib.Path(os.environ.get("LLAMA_CPP_LIB_PATH") or pathlib.Path(llama_cpp.__file__).parent / "lib")
    names = {"win32": ["ggml.dll", "libggml.dll"], "darwin": ["libggml.dylib", "libggml.so"]}.get(sys.platform, ["libggml.so"])
    for name in names:
        if (folder / name).exists():
            return ctypes.CDLL(str(folder / name))
    raise OSError(f"no ggml library in {folder}")


def ggml() -> Any:
    """libggml with the device functions typed, or None when it cannot be loaded."""
    global _ggml
    if _ggml is None:
        try:
            lib = _library()
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
        except (OSError, AttributeError):
            _ggml = False
    return _ggml or None


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
