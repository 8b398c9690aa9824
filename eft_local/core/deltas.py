"""A fine-tuning delta: a tuned model, the reference it was tuned from, and a weight.

The one parser of every form a delta is written in: ``TUNED:REFERENCE[:WEIGHT]`` on the command
line, ``(tuned, reference[, weight])`` in Python, in recipes and in evaluation configurations.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, NamedTuple

from .errors import EFTError

# Deltas' weights beyond this only push the combination to one model's argmax and, far beyond,
# overflow float64.
MAX_WEIGHT = 100.0


class Delta(NamedTuple):
    """``weight * (log p_tuned - log p_reference)``: two model files (or a recipe's model names)."""

    tuned: str
    reference: str
    weight: float = 1.0


def role_names(i: int) -> tuple[str, str]:
    """Role names of the i-th delta (from 1): tuned/reference, then tuned2/reference2, ..."""
    return ("tuned", "reference") if i == 1 else (f"tuned{i}", f"reference{i}")


def check_weight(value: Any) -> float:
    """A delta's weight: a number from -MAX_WEIGHT to MAX_WEIGHT (0 turns the delta off, > 1 amplifies it)."""
    try:
        w = float(value)
    except (TypeError, ValueError):
        w = float("nan")
    if isinstance(value, bool) or not (math.isfinite(w) and abs(w) <= MAX_WEIGHT):
        raise EFTError(f"weight must be a number from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}, got {value!r}")
    return w


def as_delta(item: Any, what: str = "a delta") -> Delta:
    """A Delta from ``(tuned, reference)`` or ``(tuned, reference, weight)``, checked; errors name it ``what``."""
    if (isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) not in (2, 3)
            or not all(isinstance(x, (str, os.PathLike)) for x in item[:2])):
        raise EFTError(f"{what} needs a tuned and a reference model (and a weight or not), got {item!r}")
    return Delta(os.fspath(item[0]), os.fspath(item[1]), check_weight(item[2]) if len(item) == 3 else 1.0)


def parse_delta(spec: str, exists: Callable[[str], bool] = os.path.exists) -> Delta:
    """``TUNED:REFERENCE[:WEIGHT]`` (weight 1 when left out).

    Paths may contain ':' (``C:\\models\\x.gguf``, ``./a:b.gguf``): the reading whose two paths
    are existing files wins; when no reading names two existing files, a ':' right after a
    drive letter belongs to its path and every other ':' separates.
    """
    found = set()
    for rest, weight in _weight_readings(spec):
        for i, char in enumerate(rest):
            if char == ":" and exists(rest[:i]) and exists(rest[i + 1:]):
                found.add(Delta(rest[:i], rest[i + 1:], weight))
    if len(found) == 1:
        return found.pop()
    if found:
        ways = " or ".join(f"{d.tuned!r} and {d.reference!r} (weight {d.weight:g})"
                           for d in sorted(found))
        raise EFTError(f"--delta {spec!r} is ambiguous: it reads as {ways}")
    parts = _split_at_colons(spec)
    weight = _number(parts[-1]) if len(parts) == 3 else 1.0
    if len(parts) in (2, 3) and parts[0] and parts[1] and weight is not None:
        return Delta(parts[0], parts[1], weight)
    raise EFTError(f"--delta {spec!r} is not TUNED:REFERENCE[:WEIGHT] (WEIGHT a number; a path with ':' must exist)")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _weight_readings(spec: str) -> Iterator[tuple[str, float]]:
    """``spec`` without a weight, and split before a trailing ``:WEIGHT`` if it ends in one."""
    yield spec, 1.0
    rest, colon, last = spec.rpartition(":")
    weight = _number(last)
    if colon and weight is not None:
        yield rest, weight


def _split_at_colons(spec: str) -> list[str]:
    """Split at every ':' but one after a drive letter (``C:\\`` or ``C:/`` starting a path)."""
    parts, start = [], 0
    for i, char in enumerate(spec):
        drive = i - start == 1 and spec[start].isascii() and spec[start].isalpha() and spec[i + 1:i + 2] in ("\\", "/")
        if char == ":" and not drive:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts
