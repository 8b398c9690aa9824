"""The chat's slash commands: a table of what a line starting with ``/`` can do.

Ollama's spellings where Ollama has the command (``/?``, ``/clear``, ``/set parameter``, ``/set
system``, ``/show``, ``/bye``), and eft-local's own for the deltas' weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

from ..chat.prompt import check_messages
from ..core.errors import EFTError
from ..core.params import SamplingParams, cli_fields


@dataclass
class Session:
    """What a chat holds: the conversation (a system message first, if any) and the options."""

    eft: Any
    options: dict[str, Any]
    messages: list[dict[str, str]] = field(default_factory=list)
    leave: bool = False

    @property
    def system(self) -> list[dict[str, str]]:
        return self.messages[:1] if self.messages and self.messages[0]["role"] == "system" else []


Command = Callable[[Session, str], str | None]


MULTI_LINE = '"""'  # a message of several lines starts and ends with it, as in Ollama


def command_lines() -> list[str]:
    """One line per command, for /help and ``chat --help``."""
    rows = [*COMMANDS.values(), (f"{MULTI_LINE} ... {MULTI_LINE}", "a message of several lines"),
            ("Ctrl-C, Ctrl-D", "stop a reply; leave")]
    width = max(len(usage) for usage, _ in rows)
    return [f"{usage:<{width}}  {text}" for usage, text in rows]


def _help(session: Session, rest: str) -> str:
    return "\n".join(["commands:", *(f"  {line}" for line in command_lines())])


def _leave(session: Session, rest: str) -> None:
    session.leave = True


def _clear(session: Session, rest: str) -> str:
    session.messages[:] = session.system
    return "(conversation cleared)"


def _weight(session: Session, rest: str, index: int = 0) -> str:
    eft = session.eft
    weights = list(eft.weights)
    try:
        weights[index] = float(rest)
    except (ValueError, IndexError):
        return f"usage: /weight W or /delta N weight W, N from 1 to {len(weights)}"
    eft.set_weights(weights)
    return f"(delta {index + 1} weight {weights[index]:g})"


def _delta(session: Session, rest: str) -> str:
    words = rest.split()
    if len(words) == 3 and words[0].isdigit() and int(words[0]) >= 1 and words[1] == "weight":
        return _weight(session, words[2], int(words[0]) - 1)
    return _weight(session, "", len(session.eft.weights))  # its usage line


# /set parameter takes a field's name, its long flags without dashes (top-k, temp, n-predict)
# and its HTTP aliases (Ollama's num_predict).
PARAMETERS = {name: f for f in cli_fields()
              for name in (f.name, *(flag.lstrip("-").split("/")[0] for flag in f.metadata["flags"]
                                     if flag.startswith("--")), *f.metadata["aliases"])}


def _value(f: dataclasses.Field, words: list[str]) -> Any:
    """A parameter's value from its words, by the field's kind."""
    cli = f.metadata["cli"]
    if cli.get("multiple"):
        return tuple(words)
    if len(words) != 1:
        raise ValueError
    if cli.get("is_flag") or "/" in f.metadata["flags"][0]:
        return {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}[words[0].lower()]
    kind = cli.get("type") or (type(f.default) if f.default is not None else str)
    return kind(words[0])


def _set(session: Session, rest: str) -> str:
    what, _, value = rest.strip().partition(" ")
    if what == "system":
        if not value.strip():
            return "usage: /set system TEXT"
        session.messages[:] = [{"role": "system", "content": value.strip()}, *session.messages[len(session.system):]]
        return "(system message set)"
    name, _, value = value.strip().partition(" ")
    f = PARAMETERS.get(name)
    if what != "parameter" or f is None:
        return f"usage: /set parameter NAME VALUE (NAME one of {', '.join(sorted(x.name for x in cli_fields()))}) " \
               "or /set system TEXT"
    try:
        options = {**session.options, f.name: _value(f, value.split())}
        SamplingParams.create(**options)  # checks the value the way a request is checked
    except (ValueError, KeyError):
        return f"error: {value.strip()!r} is not a value for {f.name}"
    except EFTError as e:
        return f"error: {e}"
    session.options.update(options)
    return f"({f.name} {value.strip()})"


def _show(session: Session, rest: str) -> str:
    eft = session.eft
    model_set = eft.model_set
    lines = [f"  {role:<12} {b.path}" for role, b in model_set.by_role.items()]
    lines.append(f"  {'weights':<12} " + ", ".join(f"delta {i} {w:g}" for i, w in enumerate(eft.weights, 1)))
    params = SamplingParams.create(**session.options)
    lines.append(f"  {'options':<12} " + ", ".join(f"{f.name} {getattr(params, f.name)}" for f in cli_fields()))
    lines.append(f"  {'system':<12} {session.system[0]['content'] if session.system else '(none)'}")
    used = max(map(len, eft.prompt_tokens(messages=session.messages).values())) if len(session.messages) > len(session.system) else 0
    lines.append(f"  {'context':<12} {used} of {model_set.n_ctx} tokens, {len(session.messages)} messages")
    return "\n".join(lines)


def _save(session: Session, rest: str) -> str:
    path = rest.strip()
    if not path:
        return "usage: /save FILE"
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        # A new file beside the old one, then one rename: a failed save leaves the old file whole.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eft-chat-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"messages": session.messages}, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        return f"error: cannot save {path}: {e.strerror or e}"
    finally:
        if tmp is not None:
            os.unlink(tmp)
    return f"(saved {len(session.messages)} messages to {path})"


def _load(session: Session, rest: str) -> str:
    path = rest.strip()
    if not path:
        return "usage: /load FILE"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        messages = data["messages"] if isinstance(data, dict) else data
        check_messages(messages)
    except OSError as e:
        return f"error: cannot load {path}: {e.strerror or e}"
    except (ValueError, KeyError, TypeError, EFTError) as e:
        return f"error: {path} is not a saved chat ({' '.join(str(e).split())[:200]})"
    session.messages[:] = [{"role": m["role"], "content": m["content"]} for m in messages]
    return f"(loaded {len(messages)} messages from {path})"


COMMANDS: dict[str, tuple[str, str]] = {}  # name -> (usage, what it does), in the order /help lists them
HANDLERS: dict[str, Command] = {}
for names, usage, text, handler in [
    (("/help", "/?"), "/help, /?", "list the commands", _help),
    (("/clear", "/reset"), "/clear, /reset", "start a new conversation (the system message stays)", _clear),
    (("/set",), "/set parameter NAME VALUE", "change a sampling option (temperature, top_k, ...; /show lists them)", _set),
    (("/set system",), "/set system TEXT", "set the system message", _set),
    (("/weight",), "/weight W", "set the first delta's weight (0: the base model alone)", _weight),
    (("/delta",), "/delta N weight W", "set delta N's weight", _delta),
    (("/show",), "/show", "the models, weights, options, system message and context used", _show),
    (("/save",), "/save FILE", "save the conversation as JSON", _save),
    (("/load",), "/load FILE", "load a conversation saved with /save", _load),
    (("/exit", "/quit", "/bye"), "/exit, /bye", "leave", _leave),
]:
    COMMANDS[names[0]] = (usage, text)
    for name in names:
        HANDLERS.setdefault(name, handler)


def run_command(session: Session, line: str) -> str | None:
    """Carry out the slash command ``line``; the text to show (None: nothing)."""
    name, _, rest = line.strip().partition(" ")
    handler = HANDLERS.get(name)
    if handler is None:
        return f"unknown command {name}; /help lists the commands, /exit leaves"
    try:
        return handler(session, rest)
    except EFTError as e:
        return f"error: {e}"
