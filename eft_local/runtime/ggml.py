"""ggml's devices, from the libraries llama-cpp-python ships.

llama-cpp-python binds llama.cpp's own API but not ggml's device functions; they are looked up
in the ggml library of the same install (loading it again returns the handle already loaded),
as llama.cpp's own tools find them.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys
from typing import Any, Sequence

import llama_cpp

# ggml_backend_dev_type (ggml-backend.h)
DEV_GPU, DEV_IGPU = 1, 2


def library(name: str) -> ctypes.CDLL:
    """llama-cpp-python's copy of the shared library ``name`` ("ggml", "ggml-cpu", "llama")."""
    folder = pathlib.Path(os.environ.get("LLAMA_CPP_LIB_PATH") or pathlib.Path(llama_cpp.__file__).parent / "lib")
    files = {"win32": [f"{name}.dll", f"lib{name}.dll"], "darwin": [f"lib{name}.dylib", f"lib{name}.so"]}
    for file in files.get(sys.platform, [f"lib{name}.so"]):
        if (folder / file).exists():
            return ctypes.CDLL(str(folder / file))
    raise OSError(f"no {name} library in {folder}")


def typed(lib: ctypes.CDLL, signatures: Sequence[tuple[str, list, Any]]) -> ctypes.CDLL:
    """``lib`` with the argument and result types of the named functions set."""
    for name, args, result in signatures:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


_ggml: Any = None


def ggml() -> Any:
    """libggml with the device functions typed (the ggml-base ones resolve through it), or None
    when it cannot be loaded."""
    global _ggml
    if _ggml is None:
        v, p, n, s = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
        try:
            _ggml = typed(library("ggml"), [
                ("ggml_backend_reg_by_name", [p], v), ("ggml_backend_reg_get_proc_address", [v, p], v),
                ("ggml_backend_reg_dev_count", [v], s), ("ggml_backend_reg_dev_get", [v, s], v),
                ("ggml_backend_dev_count", [], s), ("ggml_backend_dev_get", [s], v),
                ("ggml_backend_dev_type", [v], n), ("ggml_backend_dev_name", [v], p),
                ("ggml_backend_dev_description", [v], p),
            ])
        except (OSError, AttributeError):
            _ggml = False
    return _ggml or None


def devices() -> list[int]:
    """Every device registered in this process (the CPU included)."""
    lib = ggml()
    return [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())] if lib else []


def gpu_devices() -> list[int]:
    """The GPUs (discrete or integrated) that layers can be offloaded to. Not
    ``llama_supports_gpu_offload``, which also says yes for a build with the RPC backend."""
    lib = ggml()
    return [d for d in devices() if lib.ggml_backend_dev_type(d) in (DEV_GPU, DEV_IGPU)]


def device_names(found: Sequence[int]) -> list[str]:
    """``name (description)`` of each device."""
    lib = ggml()
    return [f"{lib.ggml_backend_dev_name(d).decode()} ({lib.ggml_backend_dev_description(d).decode()})"
            for d in found]

