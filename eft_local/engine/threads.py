"""Default threads that hold under load: every core while the others are idle, fewer when not.

llama.cpp's threads wait for each other at every operation of a decode. On an idle machine every
core is fastest; when other programs keep cores busy (a browser, a build), a worker that is not
running holds up the others, and one thread per model can be many times faster (README,
"Threads under load"). Timing steps cannot tell the two apart reliably (most steps of several
threads stay quick under load, a few wait for many milliseconds), so the cores' load is read
instead: the CPU time the system spent busy minus this process's own, from ``/proc/stat`` (Linux;
elsewhere every core is used, as llama.cpp does).
"""

from __future__ import annotations

import logging
import os
import time

_STAT, _LOADAVG = "/proc/stat", "/proc/loadavg"
_log = logging.getLogger(__name__)


def _sample() -> tuple[float, float, float] | None:
    """(seconds of busy CPU time on every core, of this process's own, monotonic now), or None."""
    try:
        with open(_STAT) as f:
            v = [int(x) for x in f.readline().split()[1:8]]
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user, nice, system, irq, softirq (not idle, iowait)
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()


def _running_now() -> int | None:
    """Tasks runnable on the machine at this instant, the reader included (Linux), or None."""
    try:
        with open(_LOADAVG) as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


class LoadThreads:
    """Threads per model: ``most``, less the cores other programs kept busy since the last look."""

    INTERVAL = 1.0  # seconds between looks (the kernel counts CPU time in 10 ms ticks)

    def __init__(self, most: int):
        self.most = self.current = most
        self._last = _sample()

    def choose(self, now: bool = False) -> int:
        """The thread count for what comes next: looked up again when ``INTERVAL`` has passed
        (or when ``now``, with at least a tenth of it measured)."""
        if self._last is None:
            return self.current
        wall = time.monotonic() - self._last[2]
        if wall >= (0.1 if now else 1.0) * self.INTERVAL:
            sample = _sample()
            others = ((sample[0] - self._last[0]) - (sample[1] - self._last[1])) / wall
            self._last = sample
        elif now and (running := _running_now()) is not None:
            others = running - 1  # too soon to average: what runs beside this thread right now
        else:
            return self.current
        chosen = max(1, min(self.most, round(self.most - others)))
        if chosen != self.current:
            _log.debug("threads per model: %d (other programs kept %.1f of %d cores busy)", chosen, others, self.most)
        self.current = chosen
        return self.current
