"""One benchmark on two checkouts of eft-local, alternated in one run, reported as ratios.

    python bench/versions.py OLD_TREE [NEW_TREE] [--rounds 2] [--script bench/speculative.py] -- ARGS...

Runs ``python SCRIPT ARGS`` from each tree in turn, each with its own ``eft_local`` first on
PYTHONPATH (NEW_TREE defaults to this checkout; ``git worktree add /tmp/old HEAD~3`` makes an old
one). Rounds alternate the order (old, new; then new, old) so that a machine growing busier
favours neither. Every markdown table row whose second cell is a number (tokens/s) is collected;
per row it prints each tree's median, the median of the new/old ratios within a round, and
each round's ratio.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parents[1]


def rows(output: str) -> dict[str, float]:
    """``section: row label`` -> the row's number, from the markdown tables in ``output``."""
    found, section = {}, ""
    for line in output.splitlines():
        if line.startswith("### "):
            section = line[4:].split(":")[0]
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) >= 2 and re.fullmatch(r"[\d.]+", cells[1]):
            # Counts that vary from run to run ("44 plain steps, 3 draft rounds") are not part of the name.
            found[f"{section}: {re.sub(r' *[(][^)]*[)]', '', cells[0])}"] = float(cells[1])
    return found


def run(tree: Path, script: str, args: tuple[str, ...]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(tree / script), *args], cwd=tree, env=env, capture_output=True,
                         text=True, check=True)
    click.echo(f"  {tree}: {time.perf_counter() - t0:.0f} s", err=True)
    return rows(out.stdout)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("old", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("new", type=click.Path(exists=True, file_okay=False, path_type=Path), default=HERE)
@click.option("--rounds", default=2, show_default=True, help="Runs of each tree.")
@click.option("--script", default="bench/speculative.py", show_default=True, help="The benchmark, relative to each tree.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def main(old: Path, new: Path, rounds: int, script: str, args: tuple[str, ...]) -> None:
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for i in range(rounds):
        click.echo(f"round {i + 1} of {rounds}", err=True)
        order = [("old", old), ("new", new)] if i % 2 == 0 else [("new", new), ("old", old)]
        for name, tree in order:
            results[name].append(run(tree.resolve(), script, args))
    labels = [label for label in results["old"][0] if all(label in r for r in results["old"] + results["new"])]
    click.echo(f"{script} {' '.join(args)}: old {old}, new {new}, {rounds} alternated rounds\n")
    click.echo("| row | old tokens/s | new tokens/s | new / old | each round |\n|---|---|---|---|---|")
    for label in labels:
        a = [r[label] for r in results["old"]]
        b = [r[label] for r in results["new"]]
        ratios = [y / x for x, y in zip(a, b) if x]
        click.echo(f"| {label} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
                   f"{statistics.median(ratios):.3f} | {' '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()
