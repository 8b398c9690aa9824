"""EFT with the base model here, on one and on two llama.cpp RPC servers on this machine.

    python bench/rpc.py [--tokens 64] [--rounds 5] [--set demo --set smollm2]

The servers (``eft-local rpc-server``) listen on 127.0.0.1, so the rows measure the protocol's
own cost, not a network's. A relay in front of two servers then counts what crosses each
connection per generated token: bytes each way, and replies (the round trips a decode waits
for), which is what a real network's bandwidth and latency act on. Runs are interleaved: each
round loads and runs every row once; tokens/s is the median over rounds, greedy, 1 thread per
model and per server. Prints markdown tables.
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from eft_local import EFT  # noqa: E402
from eft_local.runtime.rpc import reachable  # noqa: E402

PROMPT = "Where was Patroul born?"


class Relay:
    """A TCP relay in front of one server that counts the traffic each way."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.reset()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.up = self.down = self.replies = 0
            self.last = "down"

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        while True:
            try:
                data = src.recv(1 << 20)
            except OSError:
                data = b""
            with self.lock:
                if direction == "up":
                    self.up += len(data)
                else:
                    self.down += len(data)
                    # Data coming back after data went out: the client was waiting for a reply.
                    self.replies += self.last == "up" and bool(data)
                if data:
                    self.last = direction
            try:
                dst.sendall(data) if data else dst.shutdown(socket.SHUT_WR)
            except OSError:
                return
            if not data:
                return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "from eft_local.cli import main; main()", "rpc-server",
                             "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not reachable(f"127.0.0.1:{port}", timeout=1):
        if proc.poll() is not None:
            raise SystemExit("rpc-server did not start")
        time.sleep(0.1)
    return proc


def tokens_per_second(paths: list[str], rpc: list[str] | None, tokens: int, relays: list[Relay] = ()) -> tuple[float, dict]:
    """Tokens/s of one greedy generation of ``tokens`` tokens (prompt excluded), and with relays,
    what crossed each connection per token (the difference between ``tokens`` and half as many)."""
    with EFT(*paths, n_threads=1, rpc=rpc, n_ctx=512) as eft:
        eft.generate(PROMPT, temperature=0, max_tokens=4)  # warm up; the prompt stays cached
        traffic = {}
        if relays:
            counts = []
            for n in (tokens // 2, tokens):
                for r in relays:
                    r.reset()
                eft.generate(PROMPT, temperature=0, ignore_eos=True, max_tokens=n)
                counts.append([(r.up, r.down, r.replies) for r in relays])
            per = tokens - tokens // 2
            traffic = {i: tuple((b - a) / per for a, b in zip(short, long))
                       for i, (short, long) in enumerate(zip(*counts))}
        out = eft.generate(PROMPT, temperature=0, ignore_eos=True, max_tokens=tokens)
        return out.stats["completion_tokens"] / out.stats["generate_seconds"], traffic


def model_set(name: str, tmp: Path) -> list[str]:
    if name == "demo":
        return [str(ROOT / "models/demo" / f) for f in ("base.gguf", "tuned.gguf", "reference.gguf")]
    import real_models

    smol = real_models.smollm2()
    # Three files, so that three contexts run (one file in three roles is loaded once).
    return [str(smol), shutil.copy(smol, tmp / "t.gguf"), shutil.copy(smol, tmp / "r.gguf")]


@click.command()
@click.option("--tokens", default=64, show_default=True, help="Tokens per timed generation.")
@click.option("--rounds", default=5, show_default=True)
@click.option("--set", "sets", multiple=True, type=click.Choice(["demo", "smollm2"]), default=["demo", "smollm2"],
              show_default=True, help="demo: the bundled triple; smollm2: SmolLM2-135M-Instruct in all three roles.")
def main(tokens: int, rounds: int, sets: tuple[str, ...]) -> None:
    ports = [free_port(), free_port()]
    servers = [start_server(port) for port in ports]
    targets = [("127.0.0.1", port) for port in ports]
    endpoints = [f"127.0.0.1:{port}" for _, port in targets]
    counting = [Relay(t) for t in targets]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in sets:
                paths = model_set(name, Path(tmp))
                rows = {"base here": None, "base on 1 server": endpoints[:1], "base on 2 servers": endpoints}
                speeds: dict[str, list[float]] = {row: [] for row in rows}
                for _ in range(rounds):
                    for row, rpc in rows.items():
                        speeds[row].append(tokens_per_second(paths, rpc, tokens)[0])
                _, traffic = tokens_per_second(paths, [r.endpoint for r in counting], tokens, counting)
                here = statistics.median(speeds["base here"])
                click.echo(f"\n{name}: {', '.join(Path(p).name for p in paths)}; {tokens} tokens, "
                           f"median of {rounds} rounds\n")
                click.echo("| run | tokens/s | vs base here | ms / token added |\n|---|---|---|---|")
                for row, values in speeds.items():
                    tps = statistics.median(values)
                    click.echo(f"| {row} | {tps:.1f} | {tps / here:.2f} | {1000 / tps - 1000 / here:+.2f} |")
                click.echo("\nper generated token, two servers | client to server | server to client | replies waited for"
                           "\n|---|---|---|---|")
                for i, (up, down, replies) in traffic.items():
                    click.echo(f"| server {i + 1} | {up / 1024:.1f} KiB | {down / 1024:.1f} KiB | {replies:.2f} |")
    finally:
        for s in servers:
            s.kill()
            s.wait()


if __name__ == "__main__":
    main()
