"""One llama.cpp context with N sequence slots: the KV cache a batched engine decodes from.

Like llama-server's slots: each slot is a sequence (seq_id 0..N-1) with its own token list, which
always equals exactly what the KV cache holds for that sequence. One ``decode`` appends tokens to
many slots in one llama_decode per n_batch chunk, so a step of a batched engine evaluates one
pending token of every active slot at once and then reads every slot's logits row.

Memory: the KV cache is not unified (llama.cpp's ``kv_unified = false``). ``n_ctx`` is the total
context, split over the slots as llama-server's ``--ctx-size`` over ``--parallel``: each slot owns
``n_ctx / n_slots`` cells, which llama.cpp rounds up to a multiple of 256 (so 4 slots of a 256
context take 1024 cells; 8 slots of 4096 take 4096). A slot holds at most ``slot_ctx`` tokens
(its share, capped at the model's trained length), whatever the others hold.
Separate per-slot streams keep each row's attention independent of the other slots (a unified
cache computes attention over every slot's cells, which costs time at long contexts and changes
the rounding of the rows), but llama.cpp computes one micro-batch per run of consecutive slot ids
in a step (slots 0, 2, 4, 6 take four passes, 0-3 one): keeping active slots contiguous
(``best_slot`` breaks ties by the lowest id) keeps a step one pass.

The model, its tokenizer and vocabulary facts stay with the ``Backend`` this wraps
(``multi.backend``), which also keeps its own single-sequence context.
"""

from __future__ import annotations

import os
from typing import Iterable, NamedTuple, Sequence

import llama_cpp
import numpy as np

from .backend import Backend, batch_chunks, common_prefix
from .errors import EFTError
from .interrupts import sigint_deferred
from .log import llama_log_scope


class Feed(NamedTuple):
    """Tokens to append to one slot, and how many of the last of them need logits (0: none)."""

    slot: int
    tokens: Sequence[int]
    n_logits: int = 1


def _feed(f: Feed | tuple) -> Feed:
    """A Feed from a (slot, tokens[, n_logits]) tuple, with plain int token ids."""
    f = Feed(*f)
    return Feed(int(f.slot), [int(t) for t in f.tokens], int(f.n_logits))


class MultiBackend:
    """A llama.cpp context with ``n_slots`` sequences over the model of ``backend``.

    ``tokens[slot]`` is always exactly what the KV cache holds for that slot's sequence; treat
    the lists as read-only. Not thread-safe: one thread drives a MultiBackend.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        n_slots: int,
        n_ctx: int | None = None,
        n_batch: int | None = None,
        n_threads: int | None = None,
    ):
        """Make the context. ``n_ctx`` is the total over all slots (default: the backend's own);
        ``n_batch`` caps the tokens of one llama_decode (default: the backend's); ``n_threads``
        defaults to the backend's."""
        max_slots = llama_cpp.llama_max_parallel_sequences()
        if not 1 <= n_slots <= max_slots:
            raise ValueError(f"n_slots must be in [1, {max_slots}], got {n_slots}")
        self.backend = backend
        self.n_slots = n_slots
        self.n_batch = n_batch or backend.n_batch
        threads = n_threads or backend.llm.n_threads
        # The backend's parameters (attention kernel, RoPE, cache types) keep the rows
        # comparable with its own; only the sizes and the sequences differ.
        params = llama_cpp.llama_context_params.from_buffer_copy(backend.llm.context_params)
        params.n_ctx = n_ctx or backend.n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = n_slots
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = False
        with llama_log_scope():
            self.ctx = llama_cpp.llama_init_from_model(backend.llm.model, params)
        if not self.ctx:
            raise EFTError(f"cannot make a {n_slots}-slot context of {params.n_ctx} for {backend.path}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)  # cells over all slots, after llama.cpp's rounding
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(backend.llm.model)
        self.slot_ctx = min(llama_cpp.llama_n_ctx_seq(self.ctx), self.n_ctx_train)
        self.n_vocab = backend.n_vocab
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.n_evaluated = 0  # tokens run through the model, for tests and stats
        self.n_decode_calls = 0
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._owns_backend = False
        # slot -> (batch index of its first row with logits in the last llama_decode, rows)
        self._rows: dict[int, tuple[int, int]] = {}

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        n_slots: int,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
    ) -> "MultiBackend":
        """Load a model for slots only; its Backend keeps a minimal context and is closed with it."""
        threads = n_threads or int(os.environ.get("EFT_LOCAL_THREADS") or os.cpu_count() or 1)
        # 256 cells is llama.cpp's smallest context anyway.
        backend = Backend(path, n_ctx=256, n_batch=min(n_batch, 256), n_threads=threads, n_gpu_layers=n_gpu_layers)
        try:
            multi = cls(backend, n_slots=n_slots, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads)
        except BaseException:
            backend.close()
            raise
        multi._owns_backend = True
        return multi

    # --- decoding --------------------------------------------------------------------------

    def decode(self, feeds: Iterable[Feed | tuple]) -> None:
        """Append each feed's tokens to its slot, in one llama_decode per n_batch chunk.

        Afterwards ``logits(slot, i)`` reads the rows of every feed with ``n_logits`` > 0. Rows
        with logits all come back from the last llama_decode, so together they fit in one batch;
        the other tokens (a long prompt, or a part of it) fill the chunks before. A Ctrl-C
        between chunks leaves each slot with the tokens of the chunks that ran.
        """
        self._rows = {}
        feeds = sorted((_feed(f) for f in feeds), key=lambda f: f.slot)
        if not feeds:
            return
        self._check(feeds)
        for f in feeds:
            # Whatever the cache holds past a slot's history (a decode cut short) goes first.
            llama_cpp.llama_memory_seq_rm(self.memory, f.slot, len(self.tokens[f.slot]), -1)
        # Tokens without logits first, then every feed's rows with logits, in slot order (llama.cpp
        # batches runs of consecutive slots); chunks end at the list's end, so the last one holds
        # all rows with logits.
        entries: list[tuple[int, int]] = []  # (slot, token)
        for f in feeds:
            entries.extend((f.slot, t) for t in f.tokens[: len(f.tokens) - f.n_logits])
        n_heads = len(entries)
        for f in feeds:
            entries.extend((f.slot, t) for t in f.tokens[len(f.tokens) - f.n_logits :])
        for start, end in batch_chunks(len(entries), self.n_batch):
            self._decode(entries[start:end], max(n_heads - start, 0))
        # Only the first chunk is short, so the last one starts n_batch before the end; in it
        # the rows with logits follow the heads, in slot order.
        row = n_heads - max(len(entries) - self.n_batch, 0)
        for f in feeds:
            if f.n_logits:
                self._rows[f.slot] = (row, f.n_logits)
                row += f.n_logits

    def _check(self, feeds: list[Feed]) -> None:
        """Refuse a decode before anything runs."""
        seen = set()
        n_rows = 0
        for f in feeds:
            if not 0 <= f.slot < self.n_slots:
                raise ValueError(f"slot must be in [0, {self.n_slots}), got {f.slot}")
            if f.slot in seen:
                raise ValueError(f"slot {f.slot} fed twice in one decode")
            seen.add(f.slot)
            if not f.tokens:
                raise ValueError(f"slot {f.slot}: decode needs at least one token")
            if not 0 <= f.n_logits <= len(f.tokens):
                raise ValueError(f"slot {f.slot}: n_logits must be in [0, {len(f.tokens)}], got {f.n_logits}")
            if min(f.tokens) < 0 or max(f.tokens) >= self.n_vocab:
                raise ValueError(f"slot {f.slot}: token ids must be in [0, {self.n_vocab})")
            held = len(self.tokens[f.slot])
            if held + len(f.tokens) > self.slot_ctx:
                raise EFTError(
                    f"slot {f.slot} full: {held} + {len(f.tokens)} tokens exceed the {self.slot_ctx} a slot holds"
                    f" ({self._capacity_reason()})"
                )
            n_rows += f.n_logits
        if n_rows > self.n_batch:
            raise ValueError(f"{n_rows} rows with logits exceed n_batch = {self.n_batch}")

    def _capacity_reason(self) -> str:
        if self.slot_ctx == self.n_ctx_train and self.slot_ctx < llama_cpp.llama_n_ctx_seq(self.ctx):
            return "the model's trained length"
        return f"a context of {self.n_ctx} split over {self.n_slots} slots"

    def _decode(self, chunk: Sequence[tuple[int, int]], first_output: int) -> None:
        # Ctrl-C waits until the token lists record what the cache now holds.
        with sigint_deferred(), llama_log_scope():
            b = self._batch
            n_past = {}
            for i, (slot, tok) in enumerate(chunk):
                pos = n_past.get(slot, len(self.tokens[slot]))
                n_past[slot] = pos + 1
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = slot
                b.logits[i] = i >= first_output
            b.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self.ctx, b)
            self.n_decode_calls += 1
            if rc != 0:
                # A failed decode may leave some micro-batches in the cache.
                for slot in n_past:
                    llama_cpp.llama_memory_seq_rm(self.memory, slot, len(self.tokens[slot]), -1)
                raise EFTError(f"llama_decode failed with status {rc} in {os.path.basename(self.backend.path)}")
            for slot, tok in chunk:
                self.tokens[slot].append(tok)
            self.n_evaluated += len(chunk)

    def logits(self, slot: int, i: int = -1) -> np.ndarray:
        """Raw logits of ``slot``'s output row ``i`` in the last decode (-1: its last token).

        A view into llama.cpp's buffer, valid until the next decode of any slot: copy it to keep it.
        """
        first, n = self._rows.get(slot, (0, 0))
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"slot {slot}: logits row {i} not available ({n} rows in the last decode)")
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, first + i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # --- slots -----------------------------------------------------------------------------

    def trim(self, slot: int, n: int) -> None:
        """Keep only the first ``n`` tokens of ``slot``; the other slots are untouched.

        A cache that cannot drop part of a sequence (sliding-window attention) has the slot
        cleared and the kept tokens evaluated again, which ends the last decode's rows.
        """
        self._check_slot(slot)
        n = max(n, 0)
        if n >= len(self.tokens[slot]):
            return
        with sigint_deferred():
            if llama_cpp.llama_memory_seq_rm(self.memory, slot, n, -1):
                del self.tokens[slot][n:]
                return
        keep = self.tokens[slot][:n]
        self.reset(slot)
        if keep:
            self.decode([Feed(slot, keep, 0)])

    def reset(self, slot: int) -> None:
        """Forget everything ``slot`` holds."""
        self._check_slot(slot)
        with sigint_deferred():
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
            self.tokens[slot].clear()

    def sync(self, slot: int, tokens: Sequence[int]) -> int:
        """Make ``slot`` hold exactly ``tokens``, with logits for the last one.

        Reuses the longest common prefix with what the slot holds; returns how many tokens were
        evaluated. Other slots keep their tokens but lose the rows of the last decode.
        """
        if not tokens:
            raise ValueError("cannot evaluate an empty prompt")
        self._check_slot(slot)
        # The last token is always evaluated again: its logits are what the caller wants.
        keep = min(common_prefix(self.tokens[slot], tokens), len(tokens) - 1)
        before = self.n_evaluated
        self.trim(slot, keep)
        self.decode([Feed(slot, tokens[keep:], 1)])
        return self.n_evaluated - before

    def best_slot(self, tokens: Sequence[int], free_slots: Iterable[int]) -> int:
        """The free slot whose history shares the longest prefix with ``tokens`` (ties: lowest id)."""
        free = sorted(free_slots)
        if not free:
            raise ValueError("no free slot")
        for slot in free:
            self._check_slot(slot)
        return max(free, key=lambda s: (common_prefix(self.tokens[s], tokens), -s))

    def copy(self, src: int, dst: int, n: int | None = None) -> None:
        """Make ``dst`` hold the first ``n`` tokens of ``src`` (all by default) without evaluating
        them: a prompt prefix another slot already holds is shared this way.

        Separate per-slot caches copy the whole stream (llama.cpp does it before the next decode),
        then ``dst`` is trimmed to ``n``.
        """
        self._check_slot(src)
        self._check_slot(dst)
        n = len(self.tokens[src]) if n is None else min(n, len(self.tokens[src]))
        if src == dst:
            self.trim(dst, n)
            return
        if n <= 0:
            self.reset(dst)
            return
        with sigint_deferred():
            llama_cpp.llama_memory_seq_rm(self.memory, dst, -1, -1)
            self.tokens[dst].clear()
            # Between streams llama.cpp only copies whole sequences (p0 = p1 = -1).
            llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
            self.tokens[dst].extend(self.tokens[src])
        self.trim(dst, n)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot must be in [0, {self.n_slots}), got {slot}")

    def close(self) -> None:
        """Free the context and the batch (and the backend, when ``open`` loaded it)."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        ctx, self.ctx = self.ctx, None
        if ctx:
            with llama_log_scope():
                llama_cpp.llama_free(ctx)
        if self._owns_backend:
            self._owns_backend = False
            self.backend.close()
