"""Default threads follow the cores' load: all of them while the machine is idle, fewer when not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eft_local import EFT
from eft_local.engine import threads as threads_module
from eft_local.engine.threads import LoadThreads

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


class Machine:
    """A stand-in /proc: busy CPU time of the whole machine, and this process's own."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.stat, self.loadavg = tmp_path / "stat", tmp_path / "loadavg"
        monkeypatch.setattr(threads_module, "_STAT", str(self.stat))
        monkeypatch.setattr(threads_module, "_LOADAVG", str(self.loadavg))
        self.clock, self.busy, self.own = 1000.0, 0.0, 0.0
        monkeypatch.setattr(threads_module.time, "monotonic", lambda: self.clock)
        monkeypatch.setattr(threads_module.os, "times", lambda: os.times_result((self.own, 0, 0, 0, 0)))
        self.write(running=1)

    def write(self, running: int) -> None:
        ticks = int(self.busy * os.sysconf("SC_CLK_TCK"))
        self.stat.write_text(f"cpu  {ticks} 0 0 999999 0 0 0 0 0 0\ncpu0 ...\n")
        self.loadavg.write_text(f"0.10 0.20 0.30 {running}/300 12345\n")

    def run(self, seconds: float, others: float, ours: float = 0.0, running: int = 1) -> None:
        """``seconds`` pass with ``others`` cores busy elsewhere and ``ours`` here."""
        self.clock += seconds
        self.busy += seconds * (others + ours)
        self.own += seconds * ours
        self.write(running)


def test_idle_cores_keep_every_thread_and_busy_ones_take_theirs(tmp_path, monkeypatch):
    m = Machine(tmp_path, monkeypatch)
    chooser = LoadThreads(4)
    m.run(2.0, others=0.0, ours=3.5)  # this process alone, however busy
    assert chooser.choose() == 4
    m.run(2.0, others=1.0, ours=3.0)
    assert chooser.choose() == 3
    m.run(2.0, others=3.9)
    assert chooser.choose() == 1  # never fewer than one
    m.run(0.5, others=0.0)
    assert chooser.choose() == 1  # looked at again only after a second
    m.run(0.6, others=0.0)
    assert chooser.choose() == 4


def test_a_generation_that_starts_too_soon_to_average_asks_what_runs_now(tmp_path, monkeypatch):
    m = Machine(tmp_path, monkeypatch)
    chooser = LoadThreads(2)
    m.run(0.05, others=2.0, running=3)  # two busy programs and this thread
    assert chooser.choose(now=True) == 1
    m.run(0.01, others=0.0, running=1)
    assert chooser.choose(now=True) == 2
    assert chooser.choose() == 2


def test_without_proc_every_core_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(threads_module, "_STAT", str(tmp_path / "none"))
    monkeypatch.setattr(threads_module, "_LOADAVG", str(tmp_path / "none"))
    chooser = LoadThreads(8)
    time.sleep(0.15)
    assert chooser.choose(now=True) == chooser.choose() == 8


def test_explicit_threads_and_one_core_are_left_alone(monkeypatch):
    monkeypatch.setenv("EFT_LOCAL_THREADS", "1")
    with EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf") as eft:
        assert eft.model_set.threads is None
    monkeypatch.setenv("EFT_LOCAL_THREADS", "2")
    with EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf", n_threads=2) as eft:
        assert eft.model_set.threads is None


@pytest.mark.parametrize("speculative", [None, 2])
def test_every_decoding_strategy_follows_a_load_that_comes_during_the_reply(tmp_path, monkeypatch, speculative):
    m = Machine(tmp_path, monkeypatch)
    monkeypatch.setenv("EFT_LOCAL_THREADS", "2")
    with EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf") as eft:
        chunks = eft.stream("Where was Patroul born?", temperature=0, ignore_eos=True, max_tokens=12,
                            speculative=speculative)
        next(chunks)
        assert [b.context.threads for b in eft.model_set.backends] == [2, 2, 2]  # idle when it started
        m.run(1.5, others=2.0)  # two busy programs from now on
        list(chunks)
        assert [b.context.threads for b in eft.model_set.backends] == [1, 1, 1]


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the load is read from /proc (Linux)")
def test_busy_programs_beside_a_generation_take_its_threads_away(monkeypatch):
    monkeypatch.setenv("EFT_LOCAL_THREADS", "2")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(1.0)
        with EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf") as eft:
            reply = eft.generate("Where was Patroul born?", temperature=0)
            assert [b.context.threads for b in eft.model_set.backends] == [1, 1, 1]
        assert reply.text == "Their birthplace is Caltal."
    finally:
        for p in busy:
            p.kill()
            p.wait()
