"""Default threads against every fixed -t, idle and with busy programs beside, in one run.

    python bench/threads.py [--rounds 3] [--baseline OLD_TREE] [--cache DIR]

For the demo triple and the realistic triple of bench/speculative.py (a), `eft-local generate
--json` runs as a user runs it (a fresh process each time, greedy, the end token ignored) with
the default threads and with each fixed -t from 1 to the number of cores, while 0, 1 and 2 busy
loops (other processes that keep a core busy) run beside it. ``--baseline`` adds the default of
another checkout (an older eft-local) as a row. Every row is the median over the rounds of the
tokens/s the command reports (generation only, the prompt excluded); rows are interleaved within
a round, and each load's column is compared with the best fixed -t under that load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "The history of the old city begins with"
BUSY = [sys.executable, "-c", "while True: pass"]


def generate(tree: Path, models: list[str], threads: str, tokens: int) -> float:
    """tokens/s of one `eft-local generate` of ``tree`` (its own eft_local first on the path)."""
    env = {k: v for k, v in os.environ.items() if k != "EFT_LOCAL_THREADS"}
    env["PYTHONPATH"] = str(tree)
    args = [sys.executable, "-c", "from eft_local.cli import main; main()", "generate", *models, "--json",
            "--ignore-eos", "-n", str(tokens), "--temp", "0", PROMPT]
    if threads != "default":
        args += ["-t", threads]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, check=True, cwd=tree)
    return json.loads(out.stdout)["stats"]["tokens_per_second"]


@click.command()
@click.option("--rounds", default=3, show_default=True)
@click.option("--baseline", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Another checkout whose default threads run as a row of their own.")
@click.option("--cache", type=click.Path(path_type=Path), default=Path.home() / ".cache" / "eft-local" / "bench")
def main(rounds: int, baseline: Path | None, cache: Path) -> None:
    from speculative import build

    realistic, _ = build(cache)
    sets = {
        "demo triple": ([], 96),
        "realistic triple (1.7B-shaped base, Q4_0)": (
            ["-m", str(realistic["base"]), "--tuned", str(realistic["tuned"]), "--reference", str(realistic["reference"])], 16),
    }
    cores = os.cpu_count() or 1
    rows = {"default": ROOT, **{str(t): ROOT for t in range(1, cores + 1)}}
    if baseline is not None:
        rows["baseline default"] = baseline.resolve()
    click.echo(f"{cores} cores; each cell: median tokens/s of {rounds} rounds (ratio to the best fixed -t under that load)")
    for title, (models, tokens) in sets.items():
        results: dict[tuple[str, int], list[float]] = {}
        for loops in (0, 1, 2):
            busy = [subprocess.Popen(BUSY) for _ in range(loops)]
            try:
                time.sleep(1.0)
                for _ in range(rounds):
                    for name, tree in rows.items():
                        threads = name if name.isdigit() else "default"
                        results.setdefault((name, loops), []).append(generate(tree, models, threads, tokens))
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
        click.echo(f"\n{title}, {tokens} tokens\n")
        click.echo("| threads | idle | 1 busy loop | 2 busy loops |\n|---|---|---|---|")
        for name in rows:
            cells = []
            for loops in (0, 1, 2):
                tps = statistics.median(results[(name, loops)])
                best = max(statistics.median(results[(str(t), loops)]) for t in range(1, cores + 1))
                cells.append(f"{tps:.1f} ({tps / best:.2f})")
            label = {"default": "default (load-aware)", "baseline default": "previous default (all cores)"}.get(
                name, f"-t {name}")
            click.echo(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
