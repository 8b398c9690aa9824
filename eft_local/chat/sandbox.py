"""Rendering chat templates within limits: Jinja's sandbox with a cost model and a watchdog.

A chat template is Jinja code that comes with a model file, so it may be broken or hostile. The
environment is the one llama-cpp-python's ``Jinja2ChatFormatter`` renders with (the same
sandbox, extensions, filters, globals and variables), so both render alike, but every render is
bounded:

* time: ``TIME_LIMIT`` seconds of wall-clock time, after which a watchdog thread interrupts
  the render, also inside loops that print nothing;
* output: ``MAX_OUTPUT`` characters, counted as the pieces are produced;
* values: the operations that can build a large value in one step (``+``, ``*``, ``%``, ``~``,
  ``**``; the string methods center, ljust, rjust, zfill, expandtabs, replace, join, split,
  rsplit, splitlines, translate, format, format_map; the filters center, indent, wordwrap,
  format, join, replace, tojson, string, pprint, list, sort, slice, batch; lipsum and
  strftime_now; printing a list or dict; ``{% set %}`` blocks and macros) are charged their
  result's size before they run, against ``MAX_BUILT`` characters per render (a list element
  made from a string counts ``ITEM_COST``); integers are limited to ``MAX_INT_BITS`` bits.

Anything over a limit, and any template error, is one ``TemplateError`` line.
"""

from __future__ import annotations

import ctypes
import functools
import re
import string
import sys
import threading
import time
import types
from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from typing import Any, Callable, Sequence

import jinja2.ext
from jinja2 import BaseLoader, Template, TemplateSyntaxError
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from llama_cpp.llama_chat_format import Jinja2ChatFormatter


# Real templates render in well under 10 ms, and one that loops over a long chat still takes
# far less than a second; 2 s stops a runaway template quickly without failing a real one on
# a busy machine.
TIME_LIMIT = 2.0
# A chat filling a 1M-token context is about 4M characters; four times that is still a chat.
MAX_OUTPUT = 16_000_000
# Real templates copy each message a few times (``'<|im_start|>' + role + content + ...``).
MAX_BUILT = 4 * MAX_OUTPUT
# What one list element made from a string costs in memory, in characters' worth.
ITEM_COST = 64
# Templates count messages; no real one needs integers of more than a few dozen bits, and
# products or powers of bigger ones run long inside a single C call.
MAX_INT_BITS = 65_536

_MAX_MESSAGE = 300
# After the first interrupt, how often the watchdog repeats it while the thread still runs
# template code: Python swallows an exception that lands in a finalizer (a generator the
# template dropped), and the render must still stop.
_REPEAT = 0.1
# The file name Jinja compiles ``from_string`` templates under.
_TEMPLATE_FILE = "<template>"


class _Stop(BaseException):
    """A limit was hit. BaseException, so neither Jinja nor a filter's ``except Exception`` hides it."""


class _TimeUp(_Stop):
    """Raised inside the rendering thread by the watchdog."""

    def __str__(self) -> str:
        return f"rendering took longer than {TIME_LIMIT:g} s"


class _Meter:
    """One render: its thread, its deadline and the characters it may still build."""

    __slots__ = ("thread", "deadline", "left", "fired")

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.deadline = time.monotonic() + TIME_LIMIT
        self.left = MAX_BUILT
        self.fired: float | None = None

    def charge(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _Stop(f"values built while rendering would exceed {MAX_BUILT} characters")


_state = threading.local()


def _meter() -> _Meter | None:
    return getattr(_state, "meter", None)


def _interrupt(thread: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in ``thread`` at its next bytecode (None withdraws a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(exc) if exc else None)


def _in_template(thread: int) -> bool:
    """Whether ``thread`` is running template code (or code the template called)."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if frame.f_code.co_filename == _TEMPLATE_FILE:
            return True
        frame = frame.f_back
    return False


class _Watchdog:
    """One daemon thread that stops renders running past their deadline.

    Python delivers the interrupt between two bytecodes, so a template stuck in loops that
    call nothing stops too, while a render that finishes in time pays two uncontended lock
    round trips (a line tracer would slow every line of the template several times over).
    The thread never sleeps longer than ``TIME_LIMIT``, so a render that starts while it
    sleeps needs no wake-up call; it ends after a minute without renders.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._renders: set[_Meter] = set()
        self._thread: threading.Thread | None = None
        self._last = 0.0

    def watch(self, meter: _Meter) -> None:
        with self._cond:
            self._renders.add(meter)
            self._last = meter.deadline
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="eft-template-watchdog", daemon=True)
                self._thread.start()

    def release(self, meter: _Meter) -> None:
        with self._cond:
            self._renders.discard(meter)
            if meter.fired is not None:
                # An interrupt sent as the render ended must not go off in the caller's code.
                _interrupt(meter.thread, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                if not self._renders:
                    if now > self._last + 60:
                        self._thread = None
                        return
                    self._cond.wait(TIME_LIMIT)
                    continue
                for m in self._renders:
                    if m.fired is None and m.deadline <= now:
                        m.fired = now
                        _interrupt(m.thread, _TimeUp)
                    elif m.fired is not None and m.fired + _REPEAT <= now:
                        # Outside template code the interrupt could land in the caller's
                        # error handling; there the render is ending anyway.
                        m.fired = now
                        if _in_template(m.thread):
                            _interrupt(m.thread, _TimeUp)
                due = [m.deadline if m.fired is None else m.fired + _REPEAT for m in self._renders]
                self._cond.wait(min(TIME_LIMIT, *(at - now for at in due)))


_watchdog = _Watchdog()


class _Bounded:
    """Context manager: a meter for the current thread, watched for its deadline.

    Use it inside a ``try`` that catches ``_Stop`` and call ``close`` again in its ``finally``:
    an interrupt can land as ``__exit__`` starts, before it released the meter.
    """

    def __init__(self) -> None:
        self.meter = _Meter()

    def __enter__(self) -> _Meter:
        _state.meter = self.meter
        _watchdog.watch(self.meter)
        return self.meter

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        _state.meter = None
        _watchdog.release(self.meter)


# --- sizes ---------------------------------------------------------------------------------

def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _digits(text: str) -> int:
    # int() refuses strings of more than 4300 digits; anything that long is huge anyway.
    return int(text) if len(text) <= 12 else 10**13


def _shape(x: Any, memo: dict[int, tuple[int, int, int]], active: set[int]) -> tuple[int, int, int]:
    """(at most the characters of repr(x) or json.dumps(x), values inside it, nesting depth)."""
    if isinstance(x, str):
        # repr doubles quotes and backslashes at most; escapes of unprintable characters
        # (\U0001f600, \u0000 in JSON) take up to 10 characters each. Long strings are
        # remembered: a list may hold the same one many times.
        if len(x) < 256:
            return ((2 if x.isprintable() else 10) * len(x) + 2, 1, 0)
        key = id(x)
        if key not in memo:
            memo[key] = ((2 if x.isprintable() else 10) * len(x) + 2, 1, 0)
        return memo[key]
    if isinstance(x, (bytes, bytearray)):
        return (4 * len(x) + 14, 1, 0)
    if isinstance(x, int):
        return (x.bit_length() // 3 + 2, 1, 0)
    if isinstance(x, float) or x is None:
        return (24, 1, 0)
    if isinstance(x, Namespace):
        inner = object.__getattribute__(x, "_Namespace__attrs")
    elif isinstance(x, (list, tuple, set, frozenset, KeysView, ValuesView)):
        inner = x
    elif isinstance(x, Mapping):
        inner = list(x.items())
    elif isinstance(x, ItemsView):
        inner = list(x)
    else:
        return (128, 1, 0)
    key = id(x)
    if key in memo:
        return memo[key]
    if key in active:  # repr prints a cycle as [...]
        return (5, 1, 0)
    active.add(key)
    size, nodes, depth = 16, 1, 0
    for item in inner:
        s, n, d = _shape(item, memo, active)
        size, nodes, depth = size + s + 2, nodes + n, max(depth, d)
    active.discard(key)
    memo[key] = (size, nodes, depth + 1)
    return memo[key]


def _str_len(x: Any) -> int:
    """At most the characters of str(x)."""
    if isinstance(x, str):
        return len(x)
    return _shape(x, {}, set())[0]


def _same(s: str | bytes, text: str) -> str | bytes:
    return text if isinstance(s, str) else text.encode("latin-1")


# What str.split() and str.splitlines() split at, and the bytes versions.
_SPACES = (" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f", "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
           "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000", b" \t\n\r\x0b\x0c")
_LINE_BREAKS = ("\n\r\x0b\x0c\x1c\x1d\x1e", "\x85\u2028\u2029", b"\n\r")


def _count_any(s: str | bytes, chars: tuple[str, str, bytes]) -> int:
    """How many characters of ``s`` are among ``chars`` (ASCII, other Unicode, bytes)."""
    ascii_chars, unicode_chars, byte_chars = chars
    if not isinstance(s, str):
        return sum(s.count(byte_chars[i:i + 1]) for i in range(len(byte_chars)))
    found = ascii_chars if s.isascii() else ascii_chars + unicode_chars
    return sum(s.count(c) for c in found)


def _pad_cost(s: Any, width: Any = 0, *_: Any) -> int:
    return _str_len(s) + max(_int(width), 0)


def _expandtabs_cost(s: str | bytes, tabsize: Any = 8) -> int:
    return len(s) + s.count(_same(s, "\t")) * max(_int(tabsize), 0)


def _replace_cost(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, (str, bytes)) and type(old) is type(s) and type(new) is type(s)):
        return _str_len(s) * (1 + _str_len(new))
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _join_cost(sep: Any, items: Any, *_: Any) -> int:
    if isinstance(items, (str, bytes)):
        return len(items) * (1 + _str_len(sep)) + ITEM_COST * len(items)
    return sum(_str_len(item) for item in items) + len(items) * _str_len(sep)


def _split_cost(s: str | bytes, sep: Any = None, maxsplit: Any = -1) -> int:
    if sep is None:
        pieces = _count_any(s, _SPACES) + 1
    else:
        pieces = s.count(sep) + 1 if sep else 1
    if isinstance(maxsplit, int) and maxsplit >= 0:
        pieces = min(pieces, maxsplit + 1)
    return len(s) + ITEM_COST * pieces


def _splitlines_cost(s: str | bytes, keepends: Any = False) -> int:
    return len(s) + ITEM_COST * (_count_any(s, _LINE_BREAKS) + 1)


def _translate_cost(s: str | bytes, table: Any) -> int:
    if not isinstance(s, str):
        return len(s)  # a bytes table maps each byte to one byte
    values = table.values() if isinstance(table, Mapping) else table if isinstance(table, (list, tuple)) else ()
    return len(s) * max([1] + [len(v) for v in values if isinstance(v, str)])


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?.")


def _percent_cost(fmt: str | bytes, args: Any) -> int:
    """``fmt % args``: every conversion may print the biggest argument at the widest width."""
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    specs = _PERCENT_SPEC.findall(text)
    if not specs:
        return len(fmt)
    values = list(args.values()) if isinstance(args, Mapping) else list(args) if isinstance(args, tuple) else [args]
    widths = [_digits(n) for spec in specs for n in spec if n.isdigit()]
    if any("*" in spec for spec in specs):
        widths += [abs(v) for v in values if isinstance(v, int)]
    biggest = max((_str_len(v) for v in values), default=0)
    return len(fmt) + len(specs) * (biggest + max(widths, default=0))


def _format_cost(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    """``fmt.format(...)``: every field may print the biggest argument at the widest width."""
    specs = [spec or "" for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None]
    if not specs:
        return len(fmt)
    values = [*args, *kwargs.values()]
    widths = [_digits(n) for spec in specs for n in re.findall(r"\d+", spec)]
    if any("{" in spec for spec in specs):  # widths taken from the arguments
        widths += [abs(v) for v in values if isinstance(v, int)]
    biggest = max((_str_len(v) for v in values), default=0)
    return len(fmt) + len(specs) * (biggest + max(widths, default=0))


def _safe_cost(cost: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    # Arguments the operation itself rejects cost nothing: it raises its own error.
    try:
        return cost(*args, **kwargs)
    except (TypeError, ValueError, AttributeError, LookupError, OverflowError):
        return 0


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise _Stop(f"a number would exceed {MAX_INT_BITS} bits")


_SEQUENCES = (str, bytes, bytearray, list, tuple)


def _binop_cost(operator: str, left: Any, right: Any) -> int:
    if operator == "+":
        if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            return _str_len(left) + _str_len(right)
    elif operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            _check_bits(left.bit_length() + right.bit_length())
        elif isinstance(left, _SEQUENCES) and isinstance(right, int):
            return _str_len(left) * max(right, 0)
        elif isinstance(left, int) and isinstance(right, _SEQUENCES):
            return _str_len(right) * max(left, 0)
    elif operator == "%":
        if isinstance(left, (str, bytes)):
            return _percent_cost(left, right)
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            _check_bits(left.bit_length() * right)
    return 0


# --- filters and methods --------------------------------------------------------------------

def _tojson_cost(x: Any, *args: Any, **kwargs: Any) -> int:
    # llama-cpp-python's tojson takes (ensure_ascii, indent, separators), Jinja's (indent):
    # any number or string may be the indent, any pair the separators.
    extras = [*args, *kwargs.values()]
    indent = max([_int(v) for v in extras] + [len(v) for v in extras if isinstance(v, str)] + [0])
    seps = sum(len(s) for v in extras if isinstance(v, (tuple, list)) for s in v if isinstance(s, str))
    size, nodes, depth = _shape(x, {}, set())
    return size + nodes * (indent * depth + seps + 2)


def _pprint_cost(x: Any) -> int:
    size, nodes, depth = _shape(x, {}, set())
    return 2 * size + nodes * depth


def _indent_cost(s: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    w = len(width) if isinstance(width, str) else max(_int(width), 0)
    lines = s.count("\n") + 1 if isinstance(s, str) else _str_len(s)
    return _str_len(s) + lines * (w + 1)


def _wordwrap_cost(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None,
                   *_: Any, **__: Any) -> int:
    # At worst every character ends a line.
    n = _str_len(s)
    return n + (n + 1) * max(_str_len(wrapstring) if wrapstring else 0, 2)


def _chars_cost(value: Any, *_: Any, **__: Any) -> int:
    """A filter that makes a list of a string's characters."""
    return ITEM_COST * len(value) if isinstance(value, (str, bytes)) else 0


def _format_filter_cost(value: Any, *args: Any, **kwargs: Any) -> int:
    # The filter formats str(value) with the % operator.
    if isinstance(value, str):
        return _percent_cost(value, kwargs or args)
    return _str_len(value)


def _slice_cost(value: Any, slices: Any = 0, *_: Any, **__: Any) -> int:
    return _chars_cost(value) + ITEM_COST * max(_int(slices), 0)


def _batch_cost(value: Any, linecount: Any = 0, fill_with: Any = None, *_: Any, **__: Any) -> int:
    return _chars_cost(value) + (ITEM_COST * max(_int(linecount), 0) if fill_with is not None else 0)


_FILTER_COSTS: dict[str, Callable[..., int]] = {
    "center": _pad_cost,
    "indent": _indent_cost,
    "wordwrap": _wordwrap_cost,
    "format": _format_filter_cost,
    "replace": lambda s, old, new, count=None: _replace_cost(s, old, new, -1 if count is None else count),
    "tojson": _tojson_cost,
    "string": lambda s: 0 if isinstance(s, str) else _str_len(s),
    "pprint": _pprint_cost,
    "list": _chars_cost,
    "sort": _chars_cost,
    "slice": _slice_cost,
    "batch": _batch_cost,
}

_METHOD_COSTS: dict[str, Callable[..., int]] = {
    "center": _pad_cost,
    "ljust": _pad_cost,
    "rjust": _pad_cost,
    "zfill": _pad_cost,
    "expandtabs": _expandtabs_cost,
    "replace": _replace_cost,
    "join": _join_cost,
    "split": _split_cost,
    "rsplit": _split_cost,
    "splitlines": _splitlines_cost,
    "translate": _translate_cost,
}


def _materialized(items: Any) -> Any:
    """A generator as a list, so its size is known before a join consumes it."""
    if isinstance(items, (str, bytes, list, tuple)):
        return items
    try:
        return list(items)
    except TypeError:
        return items  # not iterable: the join raises its own error


def _charged_filter(func: Callable, cost: Callable[..., int]) -> Callable:
    # Filters marked with a pass_* decorator get the context/environment first.
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        meter = _meter()
        if meter is not None:
            meter.charge(_safe_cost(cost, *args[skip:], **kwargs))
        return func(*args, **kwargs)

    return wrapper


def _charged_join(func: Callable) -> Callable:
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        meter = _meter()
        if meter is not None and len(args) > skip:
            args = (*args[:skip], _materialized(args[skip]), *args[skip + 1:])
            rest = args[skip + 1:] or (kwargs.get("d", ""),)
            meter.charge(_safe_cost(_join_cost, rest[0], args[skip]))
        return func(*args, **kwargs)

    return wrapper


def _charged_global(func: Callable, cost: Callable[..., int]) -> Callable:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        meter = _meter()
        if meter is not None:
            meter.charge(_safe_cost(cost, *args, **kwargs))
        return func(*args, **kwargs)

    return wrapper


def _lipsum_cost(n: Any = 5, html: Any = True, *limits: Any, **named: Any) -> int:
    # lipsum(n, html, min, max): n paragraphs of at most max(min, max) words.
    words = [_int(w) for w in (*limits, *named.values())] or [100]
    return 16 * max(_int(n), 0) * max(*words, 0)


def _strftime_cost(f: Any) -> int:
    # One directive (%c) can print a couple of dozen characters.
    return 32 * _str_len(f)


# --- the environment ------------------------------------------------------------------------

class _CodeGenerator(CodeGenerator):
    def visit_Concat(self, node: Any, frame: Any) -> None:
        # ``a ~ b`` joins in one C call: hand the parts to the environment, which charges
        # their size first, with the join function Jinja would have used.
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(f"), {join})")


def _checked_output(value: Any) -> Any:
    """``finalize`` for ``{{ value }}``: printing a list or dict is charged before str() runs."""
    if type(value) is not str:
        meter = _meter()
        if meter is not None:
            meter.charge(_str_len(value))
    return value


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with every size-amplifying operation charged to the current render."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})
    code_generator_class = _CodeGenerator

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        meter = getattr(_state, "meter", None)
        if meter is not None:
            if type(left) is str and type(right) is str and operator == "+":
                # Most templates build every message with a chain of these: keep them cheap.
                meter.left -= len(left) + len(right)
                if meter.left < 0:
                    meter.charge(0)
            else:
                meter.charge(_safe_cost(_binop_cost, operator, left, right))
        return self.binop_table[operator](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        meter = _meter()
        if meter is not None and type(__obj) is types.BuiltinMethodType:
            owner = getattr(__obj, "__self__", None)
            cost = _METHOD_COSTS.get(__obj.__name__) if isinstance(owner, (str, bytes, bytearray)) else None
            if cost is not None:
                if __obj.__name__ == "join" and args:
                    args = (_materialized(args[0]), *args[1:])
                # Jinja passes its own _loop_vars/_block_vars along with the call.
                plain = {k: v for k, v in kwargs.items() if not k.startswith("_")}
                meter.charge(_safe_cost(cost, owner, *args, **plain))
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        fmt = value.__self__

        @functools.wraps(formatter)
        def checked(*args: Any, **kwargs: Any) -> str:
            meter = _meter()
            if meter is not None:
                meter.charge(_safe_cost(_format_cost, fmt, args, kwargs))
            return formatter(*args, **kwargs)

        return checked

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        """Join captured output ({% set %} blocks, macros), charged first."""
        meter = _meter()
        if meter is not None:
            pieces = pieces if isinstance(pieces, list) else list(pieces)
            meter.charge(sum(map(len, pieces)))
        return "".join(pieces)

    def concat_values(self, values: tuple, join: Callable[[Any], str]) -> str:
        """``a ~ b ~ ...``, charged first."""
        meter = _meter()
        if meter is not None:
            meter.charge(sum(_str_len(v) for v in values))
        return join(values)


@functools.lru_cache(maxsize=None)
def _environment() -> _BoundedEnvironment:
    """The bounded environment: ``Jinja2ChatFormatter``'s settings, extensions and tojson filter,
    with every size-amplifying filter and global charged (the tests compare both environments)."""
    env = _BoundedEnvironment(
        loader=BaseLoader(), trim_blocks=True, lstrip_blocks=True, finalize=_checked_output,
        extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = Jinja2ChatFormatter.tojson
    for name, cost in _FILTER_COSTS.items():
        if name in env.filters:
            env.filters[name] = _charged_filter(env.filters[name], cost)
    if "join" in env.filters:
        env.filters["join"] = _charged_join(env.filters["join"])
    if "lipsum" in env.globals:
        env.globals["lipsum"] = _charged_global(env.globals["lipsum"], _lipsum_cost)
    return env


def _raise_exception(message: str) -> None:
    # What Jinja2ChatFormatter gives templates: the message becomes the error.
    raise ValueError(message)


_strftime_now = _charged_global(Jinja2ChatFormatter.strftime_now, _strftime_cost)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, TemplateSyntaxError) and e.lineno:
        text += f" (line {e.lineno})"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


class TemplateError(Exception):
    """A template that does not compile, fails, or breaks a limit; the message says why in one line."""


def compile_template(source: str) -> Template:
    """``source`` compiled in the bounded environment (compiling is bounded too: Jinja works out
    constant expressions as it compiles)."""
    bounded = _Bounded()
    try:
        with bounded:
            return _environment().from_string(source)
    except _Stop as e:
        raise TemplateError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any compile error is the template's
        raise TemplateError(_one_line(e)) from None
    finally:
        bounded.close()


def render(template: Template, variables: Mapping[str, Any]) -> str:
    """``template`` rendered with ``variables`` and the helpers Jinja2ChatFormatter gives
    templates (raise_exception, strftime_now), within the limits."""
    context = {**variables, "raise_exception": _raise_exception, "strftime_now": _strftime_now}
    pieces: list[str] = []
    n = 0
    stream = template.generate(context)
    bounded = _Bounded()
    try:
        with bounded:
            for piece in stream:
                n += len(piece)
                if n > MAX_OUTPUT:
                    raise _Stop(f"output exceeds {MAX_OUTPUT} characters")
                pieces.append(piece)
    except _Stop as e:
        raise TemplateError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - template errors come from the model file
        raise TemplateError(_one_line(e)) from None
    finally:
        bounded.close()  # before close() runs template code that must not be interrupted
        stream.close()
    return "".join(pieces)
