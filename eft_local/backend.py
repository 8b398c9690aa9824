"""One llama.cpp model and its context: the tokens in its KV cache and the logits it produced.

This is the only module that holds model state. Everything it exposes is what the step loop
needs: evaluate tokens, read logits at a position, trim the cache to n tokens, vocabulary facts.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import llama_cpp
import numpy as np

from .errors import EFTError
from .interrupts import sigint_deferred
from .log import llama_log_scope, llama_verbose, load_error, model_load
from .template import llama_cpp_templates_deferred

# A piece longer than this comes back as a negative length and is retried with a larger buffer.
_PIECE_BUF = 256


# llama-cpp-python builds a model's parameters itself; a load with its own device list swaps
# their defaults for the length of that load, one load at a time.
_devices_lock = threading.Lock()


@contextmanager
def model_devices(devices: Sequence[int] | None) -> Iterator[object]:
    """Inside the block, ``llama_cpp.Llama`` loads its model onto exactly ``devices`` (ggml
    device handles), not onto every registered device; None changes nothing.

    Yields the NULL-terminated array llama.cpp reads, which must outlive the load.
    """
    if devices is None:
        yield None
        return
    array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params

    def params() -> llama_cpp.llama_model_params:
        p = default()
        p.devices = ctypes.cast(array, ctypes.c_void_p)
        return p

    with _devices_lock:
        module.llama_model_default_params = params
        try:
            yield array
        finally:
            module.llama_model_default_params = default


def check_eval(model: "Backend", tokens: Sequence[int], n_logits: int) -> None:
    """Refuse an ``eval`` before anything runs: no tokens, rows that do not fit the last chunk,
    or more tokens than the context holds. For a local ``Backend`` and an ``rpc.RPCBackend``."""
    if not tokens:
        raise ValueError("eval needs at least one token")
    if not 1 <= n_logits <= min(len(tokens), model.n_batch):
        raise ValueError(f"n_logits must be in [1, {min(len(tokens), model.n_batch)}], got {n_logits}")
    if len(model.tokens) + len(tokens) > model.n_ctx:
        raise EFTError(f"context full: {len(model.tokens)} + {len(tokens)} tokens exceed the context of {model.n_ctx}")


def batch_chunks(n: int, n_batch: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of ``n`` items in pieces of at most ``n_batch`` (a larger batch aborts
    llama.cpp). The first piece is the short one, so the last ends at ``n`` with up to
    ``n_batch`` items: every row that needs logits fits in it."""
    start = 0
    first_len = n % n_batch or n_batch
    while start < n:
        end = start + (first_len if start == 0 else n_batch)
        yield start, end
        start = end


def sync_cache(model: "Backend", tokens: Sequence[int]) -> int:
    """``model.sync``: trim its cache to the longest common prefix with ``tokens``, evaluate the
    rest; returns how many tokens were evaluated. For any model with ``tokens``, ``trim``,
    ``eval`` and ``n_evaluated`` (a local ``Backend``, an ``rpc.RPCBackend``)."""
    if not tokens:
        raise ValueError("cannot evaluate an empty prompt")
    # The last token is always evaluated again: its logits are what the caller wants.
    keep = min(common_prefix(model.tokens, tokens), len(tokens) - 1)
    before = model.n_evaluated
    model.trim(keep)
    model.eval(tokens[keep:])
    return model.n_evaluated - before


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Backend:
    """A GGUF model in its own llama.cpp context with its own KV cache.

    ``tokens`` is always exactly what the KV cache holds for sequence 0.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        devices: Sequence[int] | None = None,
    ):
        """``devices``: the ggml devices the offloaded layers go to (default: every one
        registered in this process)."""
        self.path = os.fspath(path)
        threads = n_threads or os.cpu_count() or 1
        try:
            # llama-cpp-python would compile the file's chat templates here, unbounded; eft-local
            # renders them itself, within limits (template.py).
            with model_load(), llama_cpp_templates_deferred(), model_devices(devices) as self._devices:
                self.llm = llama_cpp.Llama(
                    model_path=self.path,
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_ubatch=n_batch,
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_gpu_layers=n_gpu_layers,
                    logits_all=False,
                    verbose=llama_verbose(),
                )
        except (ValueError, RuntimeError) as e:
            # llama-cpp-python only says "Failed to load model from file"; llama.cpp's log says why.
            reason = load_error()
            raise EFTError(f"cannot load {self.path}: " + (f"llama.cpp: {reason}" if reason else str(e))) from None
        self.ctx = self.llm.ctx
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = self.llm.n_ctx()
        self.n_batch = self.llm.n_batch
        self.tokens: list[int] = []
        self.n_evaluated = 0  # tokens run through the model, for tests and stats
        self.n_decode_calls = 0
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._first_output = 0  # batch index of the first row with logits in the last decode
        self._n_outputs = 0
        self._pieces: dict[int, bytes] = {}

    # --- the cache -------------------------------------------------------------------------

    def eval(self, tokens: Sequence[int], *, n_logits: int = 1) -> None:
        """Append ``tokens`` to the cache; keep logits for the last ``n_logits`` of them.

        Long inputs are split into n_batch chunks (a larger batch aborts llama.cpp); the rows
        with logits must all fit in the final chunk.
        """
        check_eval(self, tokens, n_logits)
        # Whatever the cache holds past our history (a decode cut short) is dropped first.
        llama_cpp.llama_memory_seq_rm(self.memory, 0, len(self.tokens), -1)
        for start, end in batch_chunks(len(tokens), self.n_batch):
            chunk = tokens[start:end]
            last_chunk = end >= len(tokens)
            self._decode(chunk, len(chunk) - n_logits if last_chunk else len(chunk))

    def _decode(self, chunk: Sequence[int], first_output: int) -> None:
        # Ctrl-C waits until the token list records what the cache now holds.
        with sigint_deferred(), llama_log_scope():
            self._decode_chunk(chunk, first_output)

    def _decode_chunk(self, chunk: Sequence[int], first_output: int) -> None:
        b = self._batch
        n_past = len(self.tokens)
        for i, tok in enumerate(chunk):
            b.token[i] = tok
            b.pos[i] = n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i >= first_output
        b.n_tokens = len(chunk)
        rc = llama_cpp.llama_decode(self.ctx, b)
        self.n_decode_calls += 1
        if rc != 0:
            raise EFTError(f"llama_decode failed with status {rc} in {os.path.basename(self.path)}")
        self.tokens.extend(chunk)
        self.n_evaluated += len(chunk)
        self._first_output = first_output
        self._n_outputs = len(chunk) - first_output

    def logits(self, i: int = -1) -> np.ndarray:
        """Raw logits of output row ``i`` of the last eval (-1: the last token).

        A view into llama.cpp's buffer, valid until the next eval: copy it to keep it.
        """
        if i < 0:
            i += self._n_outputs
        if not 0 <= i < self._n_outputs:
            raise IndexError(f"logits row {i} not available ({self._n_outputs} rows)")
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, self._first_output + i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def trim(self, n: int) -> None:
        """Keep only the first ``n`` tokens in the cache.

        Some caches (sliding-window attention) cannot drop a partial sequence; those are
        cleared and the kept tokens evaluated again.
        """
        if n >= len(self.tokens):
            return
        with sigint_deferred():
            if llama_cpp.llama_memory_seq_rm(self.memory, 0, n, -1):
                del self.tokens[n:]
                return
        keep = self.tokens[:n]
        self.reset()
        if keep:
            self.eval(keep)

    def sync(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly ``tokens``, with logits for the last one.

        Reuses the longest common prefix with what is cached; returns how many tokens were
        evaluated.
        """
        return sync_cache(self, tokens)

    def reset(self) -> None:
        """Forget the whole cache."""
        with sigint_deferred():
            llama_cpp.llama_memory_clear(self.memory, True)
            self.tokens.clear()

    # --- vocabulary ------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokenize like llama.cpp: ``add_bos`` follows the model's own BOS rule when True."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

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
        return self.llm._model.token_get_text(token)

    def is_eog(self, token: int) -> bool:
        """True for the model's end-of-generation tokens (EOS, EOT, <|im_end|>, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @property
    def bos_id(self) -> int:
        return self.llm.token_bos()

    @property
    def eos_id(self) -> int:
        return self.llm.token_eos()

    def close(self) -> None:
        """Free the context, the model and the batch."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        llm, self.llm = self.llm, None
        if llm is not None:
            with llama_log_scope():
                llm.close()

    def __del__(self) -> None:
        # An EFT that was never closed is freed here, still inside eft-local's log scope
        # (llama-cpp-python's own finaliser would print llama.cpp's teardown lines).
        try:
            self.close()
        except Exception:  # noqa: BLE001 - half-built, or the interpreter is shutting down
            pass
