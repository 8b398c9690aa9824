"""Aggregate decode throughput of N sequences in one llama_decode, measured in one run.

    python bench/multi_decode.py [--threads 1] [--steps 16] [--rounds 5] [--context 64] [MODEL ...]

Without model paths: the demo base (models/demo/base.gguf, F32) and SmolLM2-135M-Instruct Q4_1
(from the test cache). For each model, one Context with 8 slots each holding a prompt of
``--context`` tokens; a step decodes one token for each of slots 0..N-1 (N = 1, 2, 4, 8) in one
llama_decode, and the slots are trimmed back after each timing, so every N sees the same context.
Rounds interleave the values of N; each cell is the median over rounds. The first row is a
single-sequence LocalBackend decoding one token at a time, for reference. Prints a markdown table.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from eft_local.runtime.context import LocalBackend  # noqa: E402
from eft_local.runtime.context import Context, Feed  # noqa: E402

SLOTS = (1, 2, 4, 8)


def time_steps(multi: Context, n: int, steps: int, context: int) -> float:
    """Tokens per second over ``steps`` decodes of one token for each of slots 0..n-1."""
    t0 = time.perf_counter()
    for k in range(steps):
        multi.decode([Feed(s, [7 + (k + s) % 50], 1) for s in range(n)])
    seconds = time.perf_counter() - t0
    for s in range(n):
        multi.trim(s, context)
    return n * steps / seconds


def time_backend(backend: LocalBackend, steps: int, context: int) -> float:
    t0 = time.perf_counter()
    for k in range(steps):
        backend.eval([7 + k % 50])
    seconds = time.perf_counter() - t0
    backend.trim(context)
    return steps / seconds


def bench_model(path: str, threads: int, steps: int, rounds: int, context: int) -> dict[str, float]:
    backend = LocalBackend(path, n_ctx=256, n_threads=threads)
    multi = Context(backend.model, n_batch=backend.n_batch, n_slots=max(SLOTS), n_ctx=max(SLOTS) * 256, n_threads=threads)
    try:
        rng = np.random.default_rng(0)
        prompts = [list(map(int, rng.integers(5, backend.n_vocab, size=context))) for _ in range(max(SLOTS))]
        multi.decode([Feed(s, p, 1) for s, p in enumerate(prompts)])
        backend.eval(prompts[0])
        time_steps(multi, max(SLOTS), 2, context)  # warm up
        results: dict[str, list[float]] = {"LocalBackend": [], **{str(n): [] for n in SLOTS}}
        for _ in range(rounds):
            results["LocalBackend"].append(time_backend(backend, steps, context))
            for n in SLOTS:
                results[str(n)].append(time_steps(multi, n, steps, context))
        return {k: statistics.median(v) for k, v in results.items()}
    finally:
        multi.close()
        backend.close()


@click.command()
@click.argument("models", nargs=-1)
@click.option("--threads", default=1, show_default=True)
@click.option("--steps", default=16, show_default=True, help="decodes per timing")
@click.option("--rounds", default=5, show_default=True)
@click.option("--context", default=64, show_default=True, help="tokens each slot holds")
def main(models: tuple[str, ...], threads: int, steps: int, rounds: int, context: int) -> None:
    if not models:
        import real_models

        models = (str(ROOT / "models" / "demo" / "base.gguf"), str(real_models.smollm2()))
    names = [Path(m).name for m in models]
    table = {name: bench_model(m, threads, steps, rounds, context) for name, m in zip(names, models)}
    click.echo(f"cores: {os.cpu_count()}; threads: {threads}; context per slot: {context} tokens\n")
    click.echo("| sequences per decode | " + " | ".join(f"{n} tok/s | ratio" for n in names) + " |")
    click.echo("|---|" + "---|---|" * len(names))
    for row, label in [("LocalBackend", "1 (LocalBackend, single-sequence context)")] + [(str(n), str(n)) for n in SLOTS]:
        cells = [f"{table[n][row]:.1f} | {table[n][row] / table[n]['1']:.2f}" for n in names]
        click.echo(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
