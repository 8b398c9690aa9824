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
from .chat_commands import MULTI_LINE, Session, command_lines, run_command
from .common import (UNDECODABLE, clean_arg, engine_options, handle_errors, load, model_options, sampling_options,
                     split_options, system_option, verbose_option)


@click.command(epilog="\b\nCommands in the chat:\n" + "\n".join(command_lines()))
@model_options
@engine_options
@sampling_options(context_shift=dict(default=True))
@system_option
@verbose_option
@handle_errors
def chat(system: str | None, **kwargs: Any) -> None:
    """Chat in the terminal; /help lists the commands (below), /exit or Ctrl-D leaves.

    Ctrl-C stops the reply in progress and keeps the conversation. When the conversation no
    longer fits the context, its oldest turns are left out (--no-context-shift: an error
    instead). At a terminal, lines can be edited and earlier ones recalled with the arrow keys
    (kept in memory only).
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


HELP = "/help lists the commands, /exit or Ctrl-D leaves, Ctrl-C stops a reply"
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
    ``stream_chat(messages, **options)`` (and more for /show and the weights), so this runs
    without models in tests.
    """
    out = out or sys.stdout
    session = Session(eft, dict(sample_kw), [{"role": "system", "content": system}] if system else [])
    out.write(f"Chatting. {HELP}.\n")
    shifted = False  # the first turn left out of the context is announced, once
    with ChatInterrupts().installed() as interrupts:
        while not session.leave:
            try:
                with interrupts.armed():
                    line = read_message(read, read(">>> "))
            except EOFError:
                out.write("\n")
                break
            except KeyboardInterrupt:
                out.write(f"\n{LEAVE_HINT}\n")
                continue
            except UnicodeDecodeError:
                sys.stderr.write("warning: that line was not UTF-8 text and was ignored\n")
                continue
            line, replaced = replace_undecodable(line)
            if replaced:
                sys.stderr.write(f"warning: {UNDECODABLE}\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                shown = run_command(session, line)
                if shown:
                    out.write(shown + "\n")
                continue
            turn = [*session.messages, {"role": "user", "content": line}]
            reply: list[str] = []
            stopped = False
            chunks = None
            stats: dict[str, Any] = {}
            try:
                with interrupts.armed():
                    chunks = eft.stream_chat(turn, **session.options)
                    for chunk in chunks:
                        if chunk.text:
                            out.write(chunk.text)
                            out.flush()
                            reply.append(chunk.text)
                        stats = getattr(chunk, "stats", None) or stats
            except KeyboardInterrupt:
                stopped = True
            except EFTError as e:
                # A turn that cannot run (the context is full) does not end the session.
                sys.stderr.write(f"error: {e}; /clear starts a new conversation\n")
                continue
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()  # a stopped stream lets go of the models now, not when collected
            # The reply as shown, stopped or not, is what the next turn continues from.
            session.messages[:] = [*turn, {"role": "assistant", "content": "".join(reply)}]
            out.write(" (stopped)\n" if stopped else "\n")
            if stats.get("context_full"):
                out.write(dim("(the reply reached the end of the context)", out) + "\n")
            if stats.get("dropped_messages") and not shifted:
                shifted = True
                out.write(dim("(the conversation no longer fits the context: its oldest turns are left out)", out)
                          + "\n")
    return session.messages


def read_message(read: Callable[[str], str], line: str) -> str:
    """``line``, or, when it starts with three double quotes, every line up to the closing ones."""
    if not line.lstrip().startswith(MULTI_LINE):
        return line
    text, lines = line.lstrip()[len(MULTI_LINE):], []
    while not text.rstrip().endswith(MULTI_LINE):
        lines.append(text)
        text = read("... ")
    lines.append(text.rstrip()[: -len(MULTI_LINE)])
    return "\n".join(lines).strip("\n")


def dim(text: str, out: TextIO) -> str:
    """``text`` dimmed on a terminal (a notice, not part of the reply)."""
    return click.style(text, dim=True) if getattr(out, "isatty", lambda: False)() else text
