"""The one interface every model context offers the engine, and the rules they share.

A ``Backend`` is one model's tokens in one KV-cache sequence: a model in a llama.cpp context of
its own (``context.LocalBackend``), one slot of a context shared by several sequences
(``context.Slot``), or the base model on llama.cpp RPC servers, run by a worker process
(``rpc.RPCBackend``). Decoding strategies see only this interface.
"""

from __future__ import annotations

import os
from typing import Iterator, Protocol, Sequence

import numpy as np

from ..core.errors import EFTError


class Backend(Protocol):
    """One model's KV-cache sequence and vocabulary.

    ``tokens`` is always exactly what the cache holds; treat it as read-only.
    """

    path: str
    n_vocab: int
    n_ctx: int  # the most tokens the sequence holds
    n_batch: int  # the most tokens one llama_decode takes
    tokens: list[int]
    n_evaluated: int  # tokens run through the model, for tests and stats

    def eval(self, tokens: Sequence[int], *, n_logits: int = 1) -> None:
        """Append ``tokens``; keep logits for the last ``n_logits`` of them."""

    def logits(self, i: int = -1) -> np.ndarray:
        """Raw logits of output row ``i`` of the last eval (-1: its last token), valid until the next eval."""

    def trim(self, n: int) -> None:
        """Keep only the first ``n`` tokens."""

    def sync(self, tokens: Sequence[int]) -> int:
        """Hold exactly ``tokens``, with logits for the last; returns how many tokens were evaluated."""

    def reset(self) -> None:
        """Forget every token."""

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokenize like llama.cpp: ``add_bos`` follows the model's own BOS rule when True."""

    def piece(self, token: int) -> bytes:
        """The bytes a token decodes to (special tokens render as nothing)."""

    def token_text(self, token: int) -> str:
        """The token's vocabulary entry, special tokens included."""

    def is_eog(self, token: int) -> bool:
        """True for the model's end-of-generation tokens (EOS, EOT, <|im_end|>, ...)."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def close(self) -> None:
        """Free what the backend holds."""


def default_threads() -> int:
    """Threads per model when none are given: ``EFT_LOCAL_THREADS``, else every core."""
    return int(os.environ.get("EFT_LOCAL_THREADS") or os.cpu_count() or 1)


def check_eval(backend: Backend, tokens: Sequence[int], n_logits: int) -> None:
    """Refuse an ``eval`` before anything runs: no tokens, rows that do not fit the last chunk,
    or more tokens than the sequence holds."""
    if not tokens:
        raise ValueError("eval needs at least one token")
    if not 1 <= n_logits <= min(len(tokens), backend.n_batch):
        raise ValueError(f"n_logits must be in [1, {min(len(tokens), backend.n_batch)}], got {n_logits}")
    if len(backend.tokens) + len(tokens) > backend.n_ctx:
        raise EFTError(f"context full: {len(backend.tokens)} + {len(tokens)} tokens exceed the context of {backend.n_ctx}")


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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable(held: Sequence[int], tokens: Sequence[int]) -> int:
    """How many tokens a cache holding ``held`` keeps to hold ``tokens``: their common prefix, but
    never the last of ``tokens``, which is evaluated again because its logits are what the
    caller wants."""
    return min(common_prefix(held, tokens), len(tokens) - 1)


def sync(backend: Backend, tokens: Sequence[int]) -> int:
    """``backend.sync``: keep what it holds of ``tokens``, evaluate the rest; returns how many
    tokens were evaluated."""
    if not tokens:
        raise ValueError("cannot evaluate an empty prompt")
    before = backend.n_evaluated
    keep = reusable(backend.tokens, tokens)
    backend.trim(keep)
    backend.eval(tokens[keep:])
    return backend.n_evaluated - before
