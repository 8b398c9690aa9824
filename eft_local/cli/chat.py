"""``eft-local chat``: the terminal chat loop."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Iterator, TextIO

import click

from ..core.errors import EFTError
from ..core.text import replace_undecodable
from .common import (UNDECODABLE, clean_arg, engine_options, handle_errors, load, model_options, sampling_options,
                     split_options, system_option, verbose_option)


@click.command()
@model_options
@engine_options
@sampling_options()
@system_option
@verbose_option
@handle_errors
def chat(system: str | None, **kwargs: Any) -> None:
    """Chat in the terminal: /reset clears the conversation, /exit (or Ctrl-D) leaves.

    Ctrl-C stops the reply in progress and keeps the conversation. At a terminal, lines can be
    edited and earlier ones recalled with the arrow keys (kept in memory only).
    """
    engine_kw, sample_kw = split_options(kwargs)
    system = clean_arg(system)
    # A line that is not UTF-8 arrives with its bytes escaped and is cleaned by the loop,
    # instead of raising inside input().
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    enable_line_editing()
    with load(**engine_kw) as eft:
        chat_loop(eft, sample_kw, system=system)


def enable_line_editing() -> None:
    """Line editing and history for ``input()`` at a terminal, as readline gives them.

    Importing the module is what switches it on; its history stays in memory (nothing calls
    ``write_history_file``). Piped input needs none of it, so readline is left alone there.
    """
    if not sys.stdin.isatty():
        return
    try:
        import readline  # noqa: F401
    except ImportError:  # Python built without it (Windows)
        pass


HELP = ("commands: /reset clears the conversation, /weight W sets the delta's weight, /delta N weight W "
        "sets delta N's, /exit leaves; Ctrl-C stops a reply")
LEAVE_HINT = "(to leave, type /exit or press Ctrl-D)"


class ChatInterrupts:
    """Chat's Ctrl-C: it stops what is armed (reading a line, a reply) and is ignored elsewhere.

    Installed as the SIGINT handler, so a KeyboardInterrupt is only ever raised inside the
    ``armed()`` blocks and never while the conversation itself is being updated.
    """

    def __init__(self) -> None:
        self._armed = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._armed = False  # a second Ctrl-C lands in the handler's cleanup unarmed
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    @contextlib.contextmanager
    def installed(self) -> Iterator["ChatInterrupts"]:
        """Handle SIGINT for the block (main thread only; elsewhere signals never arrive)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def chat_loop(eft: Any, sample_kw: dict[str, Any], *, system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO | None = None) -> list[dict[str, str]]:
    """Read a line, stream the reply, repeat. Returns the conversation when the user leaves.

    Ctrl-C stops a reply (the partial reply is kept) or, at the prompt, prints how to leave;
    anywhere else it is ignored, so the conversation is always whole. ``eft`` only needs
    ``stream_chat(messages, **options)``, so this runs without models in tests.
    """
    out = out or sys.stdout
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"Chatting. {HELP}.\n")
    with ChatInterrupts().installed() as interrupts:
        while True:
            try:
                with interrupts.armed():
                    line = read(">>> ")
            except EOFError:
                out.write("\n")
                return messages
            except KeyboardInterrupt:
                out.write(f"\n{LEAVE_HINT}\n")
                continue
            except UnicodeDecodeError:
                sys.stderr.write("warning: that line was not UTF-8 text and was ignored\n")
                continue
            line, replaced = replace_undecodable(line)
            if replaced:
                sys.stderr.write(f"warning: {UNDECODABLE}\n")
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                return messages
            if text == "/reset":
                messages = list(start)
                out.write("(conversation cleared)\n")
                continue
            if text.split()[0] in ("/weight", "/delta"):
                out.write(weight_command(eft, text) + "\n")
                continue
            if text.startswith("/"):
                out.write(f"unknown command {text.split()[0]}; {HELP}\n")
                continue
            turn = [*messages, {"role": "user", "content": line}]
            reply: list[str] = []
            stopped = False
            chunks = None
            try:
                with interrupts.armed():
                    chunks = eft.stream_chat(turn, **sample_kw)
                    for chunk in chunks:
                        if chunk.text:
                            out.write(chunk.text)
                            out.flush()
                            reply.append(chunk.text)
            except KeyboardInterrupt:
                stopped = True
            except EFTError as e:
                # A turn that cannot run (the context is full) does not end the session.
                sys.stderr.write(f"error: {e}; /reset starts a new conversation\n")
                continue
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()  # a stopped stream lets go of the models now, not when collected
            # The reply as shown, stopped or not, is what the next turn continues from.
            messages = [*turn, {"role": "assistant", "content": "".join(reply)}]
            out.write(" (stopped)\n" if stopped else "\n")


def weight_command(eft: Any, text: str) -> str:
    """Apply ``/weight W`` or ``/delta N weight W``; return the line to show."""
    try:
        index, value = parse_weight_command(text)
        weights = list(eft.weights)
        weights[index] = value
        eft.set_weights(weights)
        return f"(delta {index + 1} weight {value:g})"
    except EFTError as e:
        return f"error: {e}"
    except (ValueError, IndexError):
        return f"usage: /weight W or /delta N weight W, N from 1 to {len(eft.weights)}"


def parse_weight_command(text: str) -> tuple[int, float]:
    """``/weight W`` (the first delta) or ``/delta N weight W``: (0-based delta index, weight)."""
    words = text.split()
    if words[0] == "/weight" and len(words) == 2:
        return 0, float(words[1])
    if words[0] == "/delta" and len(words) == 4 and words[2] == "weight" and int(words[1]) >= 1:
        return int(words[1]) - 1, float(words[3])
    raise ValueError(text)


