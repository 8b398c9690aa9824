"""A GGUF model loaded through llama.cpp's C API: its weights and its vocabulary.

eft-local loads models itself rather than through ``llama_cpp.Llama``: it needs a device list per
model (``devices``), and ``Llama`` would compile the file's chat templates at load, unbounded
(eft-local renders them within limits, ``chat.template``). Contexts over a model are made by
``context.Context``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Sequence

import llama_cpp

from ..core.errors import EFTError
from .ggml import gpu_devices
from .log import llama_log_scope, load_error, model_load

# A piece longer than this comes back as a negative length and is retried with a larger buffer.
_PIECE_BUF = 256
# llama.cpp's "every layer" for n_gpu_layers (-1 in eft-local, as in llama.cpp's tools).
_ALL_LAYERS = 0x7FFFFFFF

_log = logging.getLogger(__name__)
_init_lock = threading.Lock()
_initialized = False


def backend_init() -> None:
    """Initialise llama.cpp's backends once per process."""
    global _initialized
    with _init_lock:
        if not _initialized:
            with llama_log_scope():
                llama_cpp.llama_backend_init()
            _initialized = True


class Model:
    """A GGUF file's weights (``ptr``) and vocabulary, without a context."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0, devices: Sequence[int] | None = None,
                 vocab_only: bool = False):
        """Load ``path``, offloading ``n_gpu_layers`` layers (-1: all) to ``devices`` (ggml device
        handles; default: every device registered in this process); ``vocab_only``: no weights."""
        self.path = os.fspath(path)
        backend_init()
        if n_gpu_layers and devices is None and not gpu_devices():
            # llama.cpp would say "offloaded 5/5 layers to GPU" and run them on the CPU.
            _log.warning("GPU layers were asked for, but this llama-cpp-python has no GPU offload: the models run on "
                         "the CPU (reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\" or \"-DGGML_METAL=on\")")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = _ALL_LAYERS if n_gpu_layers == -1 else n_gpu_layers
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        params.vocab_only = vocab_only
        if devices is not None:
            # NULL-terminated; llama.cpp reads it during the load only.
            array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            params.devices = ctypes.cast(array, ctypes.c_void_p)
        with model_load():
            self.ptr = llama_cpp.llama_model_load_from_file(os.fsencode(self.path), params)
        if not self.ptr:
            # llama.cpp says why only in its log.
            reason = load_error()
            raise EFTError(f"cannot load {self.path}: " + (f"llama.cpp: {reason}" if reason else "llama.cpp refused it"))
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self.bos_id = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos_id = llama_cpp.llama_vocab_eos(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))  # the model's own BOS rule
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokenize like llama.cpp: ``add_bos`` follows the model's own BOS rule when True."""
        raw = text.encode("utf-8")
        n_max = len(raw) + 2
        for _ in range(2):
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            n_max = -n  # the buffer was too small: n is minus the size needed
        raise EFTError(f"cannot tokenize a text of {len(raw)} bytes with {os.path.basename(self.path)}")

    def piece(self, token: int) -> bytes:
        """The bytes a token decodes to (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(_PIECE_BUF)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, _PIECE_BUF, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def token_text(self, token: int) -> str:
        """The token's vocabulary entry, special tokens included (for messages and templates)."""
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """True for the model's end-of-generation tokens (EOS, EOT, <|im_end|>, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        """Free the weights (every context over them must be freed first)."""
        ptr, self.ptr = self.ptr, None
        if ptr:
            with llama_log_scope():
                llama_cpp.llama_model_free(ptr)
