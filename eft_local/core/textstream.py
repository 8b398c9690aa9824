"""Token bytes in, safe text out: whole UTF-8 characters only, stop strings never leaked."""

from __future__ import annotations

import codecs
from typing import Sequence


class TextStream:
    """Turns a stream of token pieces (bytes) into text pieces.

    A character split across tokens is held until complete. Text that could be the start of
    a stop string is held until it is known not to be; when a stop string appears, the text
    before it is released and ``stopped`` becomes True.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False
        self.text = ""  # everything released so far

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: release whatever is held (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        hit = min((i for i in (self._held.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            out, self._held, self.stopped = self._held[:hit], "", True
        elif final:
            out, self._held = self._held, ""
        else:
            keep = self._partial_stop_suffix()
            out = self._held[: len(self._held) - keep]
            self._held = self._held[len(out) :]
        self.text += out
        return out

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the held text that begins some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:n]):
                    best = n
                    break
        return best
