"""llama.cpp contexts: N sequence slots over one model, and the single-sequence backend.

A ``Context`` is a KV cache with ``n_slots`` sequences (seq_id 0..N-1), as llama-server's slots:
each slot's token list always equals exactly what the cache holds for it. One ``decode`` appends
tokens to many slots in one llama_decode per n_batch chunk, so a step of the batched engine
evaluates one pending token of every active slot at once and then reads every slot's row.
``Slot`` is one sequence behind the ``Backend`` interface, and ``LocalBackend`` a model in a
one-slot context of its own: what the single-sequence strategies drive.

Memory: the cache is not unified (llama.cpp's ``kv_unified = false``). ``n_ctx`` is the total,
split over the slots as llama-server's ``--ctx-size`` over ``--parallel``: each slot owns
``n_ctx / n_slots`` cells, which llama.cpp rounds up to a multiple of 256, and holds at most
``slot_ctx`` tokens (its share, capped at the model's trained length). Separate per-slot streams
keep each row's attention independent of the other slots, but llama.cpp computes one
micro-batch per run of consecutive slot ids in a step (slots 0, 2, 4, 6 take four passes, 0-3
one): keeping active slots contiguous (``best_slot`` breaks ties by the lowest id) keeps a step
one pass.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, NamedTuple, Sequence

import llama_cpp
import numpy as np

from ..core.errors import EFTError
from ..core.interrupts import sigint_deferred
from . import backend as rules
from .backend import batch_chunks, common_prefix, default_threads
from .log import llama_log_scope
from .model import Model


class Feed(NamedTuple):
    """Tokens to append to one slot, and how many of the last of them need logits (0: none)."""

    slot: int
    tokens: Sequence[int]
    n_logits: int = 1


def _feed(f: Feed | tuple) -> tuple[int, list[int], int]:
    """(slot, token ids, n_logits) of a Feed or a (slot, tokens[, n_logits]) tuple, as plain ints
    (a plain tuple: this runs for every model at every step)."""
    return int(f[0]), [int(t) for t in f[1]], int(f[2]) if len(f) > 2 else 1


class Context:
    """A llama.cpp context with ``n_slots`` sequences over ``model``. Not thread-safe: one thread
    drives a Context."""

    def __init__(self, model: Model, *, n_slots: int = 1, n_ctx: int = 4096, n_batch: int = 512,
                 n_threads: int | None = None):
        """``n_ctx`` is the total over all slots; ``n_batch`` caps the tokens of one llama_decode."""
        max_slots = llama_cpp.llama_max_parallel_sequences()
        if not 1 <= n_slots <= max_slots:
            raise ValueError(f"n_slots must be in [1, {max_slots}], got {n_slots}")
        self.model = model
        self.n_slots = n_slots
        self.n_batch = n_batch
        self.n_threads = threads = n_threads or default_threads()  # the most it uses
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_slots
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = threads
        # As llama-cpp-python's Llama sets it, so rows match its completions.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        with llama_log_scope():
            self.ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise EFTError(f"cannot make a {n_slots}-slot context of {n_ctx} for {model.path}")
        self.threads = threads
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)  # cells over all slots, after llama.cpp's rounding
        self.slot_ctx = min(llama_cpp.llama_n_ctx_seq(self.ctx), model.n_ctx_train)
        self.n_vocab = model.n_vocab
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.n_evaluated = 0  # tokens run through the model, for tests and stats
        self.n_decode_calls = 0
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # slot -> (batch index of its first row with logits in the last llama_decode, rows)
        self._rows: dict[int, tuple[int, int]] = {}

    # --- decoding --------------------------------------------------------------------------

    def decode(self, feeds: Iterable[Feed | tuple]) -> None:
        """Append each feed's tokens to its slot, in one llama_decode per n_batch chunk.

        Afterwards ``logits(slot, i)`` reads the rows of every feed with ``n_logits`` > 0. Rows
        with logits all come back from the last llama_decode, so together they fit in one batch;
        the other tokens (a long prompt, or a part of it) fill the chunks before. A Ctrl-C
        between chunks leaves each slot with the tokens of the chunks that ran.
        """
        self._rows = {}
        feeds = [_feed(f) for f in feeds]
        if not feeds:
            return
        feeds.sort()  # by slot
        self._check(feeds)
        for slot, _, _ in feeds:
            # Whatever the cache holds past a slot's history (a decode cut short) goes first.
            llama_cpp.llama_memory_seq_rm(self.memory, slot, len(self.tokens[slot]), -1)
        # Tokens without logits first, then every feed's rows with logits, in slot order (llama.cpp
        # batches runs of consecutive slots); chunks end at the list's end, so the last one holds
        # all rows with logits.
        entries = [(slot, t) for slot, tokens, n in feeds for t in tokens[: len(tokens) - n]]
        n_heads = len(entries)
        entries += [(slot, t) for slot, tokens, n in feeds for t in tokens[len(tokens) - n :]]
        for start, end in batch_chunks(len(entries), self.n_batch):
            self._decode(entries[start:end], max(n_heads - start, 0))
        # Only the first chunk is short, so the last one starts n_batch before the end; in it
        # the rows with logits follow the heads, in slot order.
        row = n_heads - max(len(entries) - self.n_batch, 0)
        for slot, _, n in feeds:
            if n:
                self._rows[slot] = (row, n)
                row += n

    def _check(self, feeds: list[tuple[int, list[int], int]]) -> None:
        """Refuse a decode before anything runs."""
        n_rows = 0
        for slot, tokens, n_logits in feeds:
            if not 0 <= slot < self.n_slots:
                raise ValueError(f"slot must be in [0, {self.n_slots}), got {slot}")
            if not tokens:
                raise ValueError(f"slot {slot}: decode needs at least one token")
            if not 0 <= n_logits <= len(tokens):
                raise ValueError(f"slot {slot}: n_logits must be in [0, {len(tokens)}], got {n_logits}")
            if min(tokens) < 0 or max(tokens) >= self.n_vocab:
                raise ValueError(f"slot {slot}: token ids must be in [0, {self.n_vocab})")
            held = len(self.tokens[slot])
            if held + len(tokens) > self.slot_ctx:
                if self.n_slots == 1:
                    raise EFTError(f"context full: {held} + {len(tokens)} tokens exceed the context of {self.slot_ctx}")
                raise EFTError(f"slot {slot} full: {held} + {len(tokens)} tokens exceed the {self.slot_ctx} a slot "
                               f"holds ({self._capacity_reason()})")
            n_rows += n_logits
        if len(feeds) > 1 and len({slot for slot, _, _ in feeds}) < len(feeds):
            twice = next(a for (a, _, _), (b, _, _) in zip(feeds, feeds[1:]) if a == b)
            raise ValueError(f"slot {twice} fed twice in one decode")
        if n_rows > self.n_batch:
            raise ValueError(f"{n_rows} rows with logits exceed n_batch = {self.n_batch}")

    def _capacity_reason(self) -> str:
        if self.slot_ctx == self.model.n_ctx_train and self.slot_ctx < llama_cpp.llama_n_ctx_seq(self.ctx):
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
                raise EFTError(f"llama_decode failed with status {rc} in {os.path.basename(self.model.path)}")
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
            if self.n_slots == 1:
                llama_cpp.llama_memory_clear(self.memory, True)
            else:
                llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
            self.tokens[slot].clear()

    def slot(self, slot: int) -> "Slot":
        """``slot`` as a Backend of its own."""
        return Slot(self, slot)

    def best_slot(self, tokens: Sequence[int], free_slots: Iterable[int]) -> int:
        """The free slot whose history shares the longest prefix with ``tokens`` (ties: lowest id)."""
        free = sorted(free_slots)
        if not free:
            raise ValueError("no free slot")
        for slot in free:
            self._check_slot(slot)
        return max(free, key=lambda s: (common_prefix(self.tokens[s], tokens), -s))

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot must be in [0, {self.n_slots}), got {slot}")

    def close(self) -> None:
        """Free the context and the batch (not the model)."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        ctx, self.ctx = self.ctx, None
        if ctx:
            with llama_log_scope():
                llama_cpp.llama_free(ctx)

    def set_threads(self, n: int) -> None:
        """Decode with ``n`` threads from now on."""
        with llama_log_scope():
            llama_cpp.llama_set_n_threads(self.ctx, n, n)
        self.threads = n


class Slot:
    """One sequence of a Context, as a ``Backend``: what the single-sequence strategies drive."""

    def __init__(self, context: Context, slot: int = 0):
        context._check_slot(slot)
        self.context = context
        self.slot = slot
        self.model = context.model
        self.path = self.model.path
        self.n_vocab = context.n_vocab
        self.n_ctx = context.slot_ctx
        self.n_batch = context.n_batch
        self.tokens = context.tokens[slot]  # the same list: it changes as the context decodes
        # Bound once: every step reads each model's row.
        self.logits = functools.partial(context.logits, slot)
        self.tokenize, self.piece, self.token_text, self.is_eog = (
            self.model.tokenize, self.model.piece, self.model.token_text, self.model.is_eog)
        self.bos_id, self.eos_id = self.model.bos_id, self.model.eos_id

    @property
    def n_evaluated(self) -> int:
        return self.context.n_evaluated

    @property
    def n_decode_calls(self) -> int:
        return self.context.n_decode_calls

    def eval(self, tokens: Sequence[int], *, n_logits: int = 1) -> None:
        """Append ``tokens``; keep logits for the last ``n_logits`` of them.

        Long inputs are split into n_batch chunks (a larger batch aborts llama.cpp); the rows
        with logits must all fit in the final chunk.
        """
        self.context.decode(((self.slot, tokens, n_logits),))

    def trim(self, n: int) -> None:
        """Keep only the first ``n`` tokens."""
        self.context.trim(self.slot, n)

    def sync(self, tokens: Sequence[int]) -> int:
        """Hold exactly ``tokens``, with logits for the last one, reusing the longest common
        prefix; returns how many tokens were evaluated."""
        return rules.sync(self, tokens)

    def reset(self) -> None:
        """Forget every token."""
        self.context.reset(self.slot)

    def close(self) -> None:
        """A slot frees nothing: its context does."""


class LocalBackend(Slot):
    """A GGUF model in a llama.cpp context of its own, with its own KV cache (one sequence)."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 4096, n_batch: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int = 0, devices: Sequence[int] | None = None):
        """``devices``: the ggml devices the offloaded layers go to (default: every one
        registered in this process)."""
        model = Model(path, n_gpu_layers=n_gpu_layers, devices=devices)
        try:
            # As llama-cpp-python's Llama: a batch never exceeds the context.
            context = Context(model, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads)
        except BaseException:
            model.close()
            raise
        super().__init__(context, 0)

    def close(self) -> None:
        """Free the context, then the model."""
        self.context.close()
        self.model.close()

    def __del__(self) -> None:
        # One never closed is freed here, still inside eft-local's log scope (llama.cpp would
        # otherwise print its teardown lines at exit).
        try:
            self.close()
        except Exception:  # noqa: BLE001 - half-built, or the interpreter is shutting down
            pass
