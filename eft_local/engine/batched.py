"""Batched EFT decoding: many requests at once, one llama_decode per model per step.

A scheduler thread owns one ``Context`` (N sequence slots in one llama.cpp context) per distinct
model of a ``ModelSet``. Each step it admits waiting requests into free slots (the slot whose
cache shares the longest prefix with the request), feeds every active slot its pending token,
or the next chunk of its prompt so that running streams keep flowing, in one decode per model,
combines all the rows that are ready in one vectorized NumPy pass, and samples each sequence
with its own sampler, weights, plausibility filter and seed. Requests join and leave between
steps (continuous batching). Speculative requests do not come here: they run one at a time on
the single-sequence contexts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.backend import reusable
from ..core.combine import log_softmax
from ..core.errors import EFTError
from ..runtime.context import Context, Feed
from .results import Chunk, Reply
from ..core.sampling import Sampler

if TYPE_CHECKING:
    from ..runtime.backend import Backend
    from .model_set import Mix, ModelSet

# Prompt tokens one slot feeds per step: a long prompt is taken in pieces, so that the other
# slots still get a token each step.
PREFILL_CHUNK = 256


@dataclass(eq=False)
class _Seq:
    """One request: its prompts per model, its options, and where its generation stands."""

    prompts: dict["Backend", list[int]]
    reply: Reply  # and the request's options, reply.params
    sampler: Sampler
    rng: np.random.Generator
    mix: "Mix"
    out: "queue.SimpleQueue[Chunk | BaseException]" = field(default_factory=queue.SimpleQueue)
    slot: int = -1
    fed: dict["Backend", int] = field(default_factory=dict)  # prompt tokens the slot holds
    pending: int | None = None  # sampled, shown, not yet fed
    prompt_eval: int = 0
    cancelled: bool = False
    t_admitted: float = 0.0
    t_ready: float = 0.0


class Batcher:
    """Continuous batching over ``model_set`` with ``n_slots`` sequences per model.

    ``n_ctx`` is the context of each model's slots together: it is split over them, as
    llama-server splits ``--ctx-size`` over ``--parallel``.
    """

    def __init__(self, model_set: "ModelSet", n_slots: int, n_ctx: int):
        self.model_set = model_set
        self.n_slots = n_slots
        self.slots: dict[Backend, Context] = {}  # each distinct model's slots
        try:
            for b in model_set.backends:
                # The batch size of the model's own context keeps the slots' rows comparable with its.
                self.slots[b] = Context(b.model, n_slots=n_slots, n_ctx=n_ctx, n_batch=b.n_batch,
                                        n_threads=b.context.n_threads)
        except BaseException:
            self._close_contexts()
            raise
        self.slot_ctx = min(m.slot_ctx for m in self.slots.values())
        self._waiting: deque[_Seq] = deque()
        self._active: dict[int, _Seq] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run, for tests and stats
        self._thread = threading.Thread(target=self._serve, name="eft-batch", daemon=True)
        self._thread.start()

    # --- the caller's side -----------------------------------------------------------------

    def submit(self, by_role: dict[str, list[int]], reply: Reply, sampler: Sampler, rng: np.random.Generator,
               mix: "Mix") -> "_Stream":
        """Queue a request; its chunks arrive as the scheduler produces them."""
        prompts = {self.model_set.by_role[role]: list(toks) for role, toks in by_role.items()}
        longest = max(len(t) for t in prompts.values())
        if longest >= self.slot_ctx:
            raise EFTError(f"prompt has {longest} tokens but a slot holds {self.slot_ctx} "
                           f"(the context split over {self.n_slots} slots, or the trained length)")
        seq = _Seq(prompts, reply, sampler, rng, mix)
        with self._cond:
            if self._closed:
                raise EFTError("this EFT is closed")
            self._waiting.append(seq)
            self._cond.notify()
        return self._chunks(seq)

    @staticmethod
    def _chunks(seq: _Seq) -> "_Stream":
        return _Stream(seq)

    def close(self) -> None:
        """Stop the scheduler; unfinished requests end with EFTError."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._close_contexts()

    def _close_contexts(self) -> None:
        for m in self.slots.values():
            m.close()
        self.slots.clear()

    # --- the scheduler ---------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - every running request learns why, the scheduler goes on
                error = e if isinstance(e, EFTError) else EFTError(f"{type(e).__name__}: {e}")
                for seq in list(self._active.values()):
                    seq.out.put(error)
                    try:
                        self._reset(seq.slot)
                    except Exception:  # noqa: BLE001 - the slot is dropped either way
                        pass
                self._active.clear()
        error = EFTError("this EFT is closed")
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in [*self._active.values(), *waiting]:
            seq.out.put(error)
        self._active.clear()

    def _reset(self, slot: int) -> None:
        """Empty ``slot`` in every model (after a failed step its contents are unknown)."""
        for m in self.slots.values():
            m.reset(slot)

    def step(self) -> None:
        """Admit, decode one step for every active slot, sample the sequences that are ready."""
        self._drop_cancelled()
        self._admit()
        feeds: dict[Context, list[Feed]] = {m: [] for m in self.slots.values()}
        ready: list[_Seq] = []
        for seq in self._active.values():
            if seq.pending is not None:
                for m in self.slots.values():
                    feeds[m].append(Feed(seq.slot, [seq.pending], 1))
                ready.append(seq)
            elif self._prefill(seq, feeds):
                ready.append(seq)
        # The slots' contexts follow the load as the model set's own do (one look per step).
        threads = self.model_set.threads.choose() if self.model_set.threads is not None else None
        for m, fs in feeds.items():
            if threads is not None and m.threads != threads:
                m.set_threads(threads)
            if fs:
                m.decode(fs)
        self.steps += 1
        if ready:
            self._sample(ready)

    def _drop_cancelled(self) -> None:
        for slot, seq in list(self._active.items()):
            if seq.cancelled:
                # What the slot holds stays cached: a later request may share its prefix.
                del self._active[slot]
        with self._cond:
            self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _admit(self) -> None:
        free = [s for s in range(self.n_slots) if s not in self._active]
        tuned_backend = self.model_set.by_role["tuned"]
        tuned = self.slots[tuned_backend]
        while free:
            with self._cond:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            slot = tuned.best_slot(seq.prompts[tuned_backend], free)
            free.remove(slot)
            seq.slot = slot
            for b, m in self.slots.items():
                prompt = seq.prompts[b]
                keep = reusable(m.tokens[slot], prompt)
                m.trim(slot, keep)
                seq.fed[b] = keep
            seq.t_admitted = time.perf_counter()
            self._active[slot] = seq

    def _prefill(self, seq: _Seq, feeds: dict[Context, list[Feed]]) -> bool:
        """Feed the next piece of each model's prompt; True when every model's last row comes now.

        Rows only last until the next decode, so every model feeds its last prompt token in the
        same step: a model whose remaining prompt is short waits for the others.
        """
        left = {b: len(seq.prompts[b]) - seq.fed[b] for b in self.slots}
        final = all(n <= PREFILL_CHUNK for n in left.values())
        tuned = self.model_set.by_role["tuned"]
        for b, m in self.slots.items():
            n = left[b] if final else min(PREFILL_CHUNK, left[b] - 1)
            if n <= 0:
                continue
            start = seq.fed[b]
            feeds[m].append(Feed(seq.slot, seq.prompts[b][start:start + n], 1 if final else 0))
            seq.fed[b] += n
            if b is tuned:
                seq.prompt_eval += n
        return final

    def _sample(self, ready: list[_Seq]) -> None:
        """One vectorized combination for every ready sequence, then each samples on its own."""
        rows = {b: log_softmax(np.stack([m.logits(seq.slot) for seq in ready])) for b, m in self.slots.items()}
        combined = self.model_set.combine_rows(rows, [seq.mix for seq in ready])
        now = time.perf_counter()
        for seq, logp in zip(ready, combined):
            if seq.pending is None:
                seq.t_ready = now
            self._take(seq, seq.sampler.sample(logp, seq.rng), logp)

    def _take(self, seq: _Seq, token: int, logp: np.ndarray) -> None:
        """Show ``token`` and decide whether the sequence goes on."""
        chunk = seq.reply.take(token, logp)
        if chunk is not None:
            seq.out.put(chunk)
        full = any(len(m.tokens[seq.slot]) >= self.slot_ctx for m in self.slots.values())
        if seq.reply.finish is None and not full:
            seq.pending = token
            return
        seq.out.put(seq.reply.end(
            prompt_tokens=len(seq.prompts[self.model_set.by_role["tuned"]]), prompt_eval_tokens=seq.prompt_eval,
            prompt_seconds=seq.t_ready - seq.t_admitted, generate_seconds=time.perf_counter() - seq.t_ready,
            slot=seq.slot))
        del self._active[seq.slot]


class _Stream:
    """A request's chunks as the scheduler produces them; ``close`` gives up its place.

    An iterator object rather than a generator: closing one that was never read must still
    tell the scheduler (a generator that never started runs no ``finally``).
    """

    def __init__(self, seq: _Seq):
        self._seq = seq
        self._done = False

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        try:
            item = self._seq.out.get()
        except BaseException:
            self.close()
            raise
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finish_reason is not None:
            self.close()
        return item

    def close(self) -> None:
        """Stop reading: the scheduler frees the slot (or drops the queued request) at its next step."""
        self._done = True
        self._seq.cancelled = True

    def __del__(self) -> None:
        self._seq.cancelled = True
