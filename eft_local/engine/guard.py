"""One generation at a time on an EFT: other threads wait, the same thread is told.

The models' KV caches and token lists are one conversation's state. Two generations that touch
them at once crash llama.cpp or answer one prompt from the other's history, so every use of the
models holds this guard. A thread that already holds it (an unfinished stream, then a second
call) would wait for itself forever, so it gets an ``EFTError`` instead.

Usage, written out at each place because Ctrl-C must never leave the lock taken::

    with guard.take():      # the lock itself: C code takes and gives it back, whatever Ctrl-C does
        guard.enter()
        try:
            ...
        finally:
            guard.leave()

A Python context manager would not do: a KeyboardInterrupt can be raised as its ``__exit__``
starts, before it releases anything.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

from ..core.errors import EFTError

BUSY = ("this EFT is busy with an unfinished stream: read it to the end or close() it before "
        "starting another call")


class Guard:
    """A lock with an owner, a closed flag and a last action after close."""

    def __init__(self, on_close: Callable[[], None]):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._on_close = on_close
        self.closed = False

    def take(self) -> threading.Lock:
        """Check that this thread may wait for the models; return the lock to hold them with."""
        if self.closed:
            raise EFTError("this EFT is closed")
        # The owner can be stale after a Ctrl-C; it only counts while the lock is taken.
        if self._owner == threading.get_ident() and self._lock.locked():
            raise EFTError(BUSY)
        return self._lock

    def enter(self) -> None:
        """Record this thread as the holder (the lock is taken)."""
        self._owner = threading.get_ident()
        if self.closed:
            raise EFTError("this EFT is closed")

    def leave(self) -> None:
        """Forget the holder; free the models if ``close`` was called meanwhile."""
        self._owner = None
        if self.closed:
            self._on_close()

    def close(self) -> None:
        """Mark closed and run ``on_close`` now, or when this thread's unfinished stream ends.

        From another thread this waits for a running generation to finish.
        """
        if self._owner == threading.get_ident() and self._lock.locked():
            self.closed = True
            return
        with self._lock:
            self.closed = True
            self._on_close()


def holding(method: Callable) -> Callable:
    """Run an EFT method with the models held (the object keeps its guard in ``_guard``)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        guard = self._guard
        with guard.take():
            guard.enter()
            try:
                return method(self, *args, **kwargs)
            finally:
                guard.leave()

    return wrapper
