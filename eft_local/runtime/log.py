"""Logging: the ``eft_local`` logger, and llama.cpp's log while eft-local runs its own models.

The library only logs; it configures nothing (the command line adds a handler). llama.cpp has a
single, process-wide log callback, which llama-cpp-python sets when it is imported. eft-local
installs its own only inside ``llama_log_scope()`` (its model loads, decodes and frees, or a
whole ``eft-local`` command) and puts back whatever was installed before when the outermost
scope ends, so any other ``llama_cpp.Llama`` in the process logs exactly as it would without
eft-local. Inside a scope, llama.cpp's lines go to the ``eft_local.llama_cpp`` logger, at
llama.cpp's own level.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from contextlib import contextmanager
from typing import Iterator

import llama_cpp

logger = logging.getLogger("eft_local")
llama_logger = logging.getLogger("eft_local.llama_cpp")
# Without a handler of its own, Python would print the library's warnings through its
# last-resort handler; an application (or the command line) decides where they go.
logger.addHandler(logging.NullHandler())

# ggml_log_level values (ggml.h); CONT continues the previous message.
_LOG_ERROR = 4
_LOG_CONT = 5
_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}

# The latest llama.cpp messages as (level, text): where a refused file's reason is found.
# deque.append is atomic, so threads that log at once do no harm.
_recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=64)


class _PartialLine(threading.local):
    """Text of the current thread's unfinished line (llama.cpp logs a line in pieces)."""

    text = ""
    level = logging.INFO


_partial = _PartialLine()


def _forward(level: int, text: str) -> None:
    """Send every complete line of ``text`` to the llama.cpp logger; keep an unfinished one."""
    if level != _LOG_CONT:
        if _partial.text:  # a new message ends an unfinished one
            _emit(_partial.level, _partial.text)
            _partial.text = ""
        _partial.level = _LEVELS.get(level, logging.INFO)
    *lines, _partial.text = (_partial.text + text).split("\n")
    for line in lines:
        _emit(_partial.level, line)


def _emit(level: int, line: str) -> None:
    if line.strip() and llama_logger.isEnabledFor(level):
        llama_logger.log(level, line.rstrip())


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    try:
        message = text.decode("utf-8", errors="replace")
        _recent.append((level, message))
        _forward(level, message)
    except Exception:  # noqa: BLE001 - an exception cannot cross back into C
        pass


def _installed() -> tuple[object, ctypes.c_void_p]:
    """The callback llama.cpp uses now, to be put back later."""
    callback, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(user_data))
    return callback, user_data


_lock = threading.Lock()
_depth = 0
_previous: tuple[object, ctypes.c_void_p] | None = None


@contextmanager
def llama_log_scope() -> Iterator[None]:
    """Route llama.cpp's log to the ``eft_local.llama_cpp`` logger for the block.

    Nestable and usable from several threads at once: the first block to start installs the
    callback, the last to end restores the previous one. While any block runs, llama.cpp's
    callback is process-wide, so every llama.cpp message in that time comes here.
    """
    global _depth, _previous
    with _lock:
        if _depth == 0:
            _previous = _installed()
            llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        _depth += 1
    try:
        yield
    finally:
        if _partial.text:  # an unfinished line (progress dots) ends with the block
            _emit(_partial.level, _partial.text)
            _partial.text = ""
        with _lock:
            _depth -= 1
            if _depth == 0 and _previous is not None:
                llama_cpp.llama_log_set(*_previous)
                _previous = None


@contextmanager
def model_load() -> Iterator[None]:
    """Around a model load of eft-local's: its log is ours, and ``load_error`` then tells why
    llama.cpp refused the file."""
    _recent.clear()
    with llama_log_scope():
        yield


def load_error() -> str | None:
    """llama.cpp's last error message since the latest ``model_load()`` began, as one line."""
    errors: list[str] = []
    for level, message in list(_recent):
        if level == _LOG_CONT and errors:
            errors[-1] += message
        elif level == _LOG_ERROR:
            errors.append(message)
    lines = [line.strip() for e in errors for line in e.splitlines() if line.strip()]
    # The loader's closing "failed to load model" says nothing the caller does not know.
    lines = [line for line in lines if not line.endswith("failed to load model")]
    if not lines:
        return None
    # "llama_model_load: error loading model: <reason>": the function name is noise to a user.
    reason = lines[-1]
    prefix = "error loading model: "
    if prefix in reason:
        reason = reason.split(prefix, 1)[1]
    return reason
