"""Text from users: prompts, messages and stop strings must be real Unicode.

Python turns bytes that are not UTF-8 (in command-line arguments, say) into lone surrogates,
which cannot be encoded for the tokenizer. The library refuses them with a clear error; the
command line replaces them with U+FFFD and warns (``replace_undecodable``).
"""

from __future__ import annotations

from .errors import EFTError


def has_surrogates(text: str) -> bool:
    """True when ``text`` holds lone surrogates (undecodable bytes) and so is not encodable."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(text: str, what: str) -> str:
    """Return ``text``, or raise EFTError when it cannot be encoded as UTF-8."""
    if has_surrogates(text):
        raise EFTError(f"{what} is not valid text (it holds bytes that are not UTF-8)")
    return text


def replace_undecodable(text: str) -> tuple[str, bool]:
    """``text`` with each undecodable byte replaced by U+FFFD; True when anything was replaced."""
    if not has_surrogates(text):
        return text, False
    try:
        # Bytes that surrogateescape smuggled in (argv, stdin) decode as U+FFFD one by one.
        return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace"), True
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text), True
