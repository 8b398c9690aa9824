"""Ctrl-C that never lands in the middle of a cache update.

A KeyboardInterrupt is raised between two Python bytecodes, wherever the main thread happens to
be. Between llama.cpp changing a KV cache and our token list recording the change, it would
leave the two out of step, and later answers would be computed from the wrong history. Code in
``sigint_deferred()`` holds Ctrl-C back until the block ends, then lets the previous handler act
on it as usual.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


class _Recorder:
    """A SIGINT handler that only remembers that Ctrl-C was pressed."""

    def __init__(self) -> None:
        self.frame: Any = None
        self.pressed = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.pressed = True
        self.frame = frame


# How deep the main thread is in deferred blocks: inner blocks cost no handler swap (about
# 20 microseconds), so the step loop can cover all models' decodes with one.
_depth = 0


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Run the block with Ctrl-C held back; a Ctrl-C pressed meanwhile takes effect at its end.

    Only the main thread receives signals, so elsewhere (and when SIGINT is ignored or left to
    the operating system) this does nothing. Nested blocks defer to the outermost one.
    """
    global _depth
    if _depth or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    recorder = _Recorder()
    signal.signal(signal.SIGINT, recorder)
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        signal.signal(signal.SIGINT, previous)
        if recorder.pressed:
            previous(signal.SIGINT, recorder.frame)
