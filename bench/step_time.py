"""Sequential vs concurrent EFT step time, measured in one run.

    python bench/step_time.py [--tokens 64] [--repeats 3] [BASE TUNED REFERENCE]

Without model paths it uses SmolLM2-135M-Instruct (from the test cache) in all three roles,
as three files so that three contexts run. Prints a markdown table.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from eft_local import EFT  # noqa: E402


def time_steps(paths: list[str], concurrent: bool, tokens: int, repeats: int) -> float:
    """Median milliseconds per generated token (prompt excluded)."""
    with EFT(*paths, concurrent=concurrent, n_ctx=2048) as eft:
        eft.generate("Warm up.", temperature=0, max_tokens=4)
        times = []
        for i in range(repeats):
            out = eft.generate(f"Write a story about a dog, part {i}.", temperature=0, max_tokens=tokens)
            times.append(out.stats["generate_seconds"] / max(out.stats["completion_tokens"], 1))
        return 1000 * sorted(times)[len(times) // 2]


@click.command()
@click.argument("models", nargs=-1)
@click.option("--tokens", default=64, show_default=True)
@click.option("--repeats", default=3, show_default=True)
def main(models: tuple[str, ...], tokens: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        if not models:
            import real_models

            smol = real_models.smollm2()
            models = (str(smol), shutil.copy(smol, Path(d) / "t.gguf"), shutil.copy(smol, Path(d) / "r.gguf"))
        seq = time_steps(list(models), False, tokens, repeats)
        conc = time_steps(list(models), True, tokens, repeats)
    click.echo(f"cores: {os.cpu_count()}; models: {', '.join(Path(m).name for m in models)}\n")
    click.echo("| mode | ms / token | relative |\n|---|---|---|")
    click.echo(f"| sequential (all cores per model) | {seq:.1f} | 1.00 |")
    click.echo(f"| concurrent (threads, cores split) | {conc:.1f} | {conc / seq:.2f} |")


if __name__ == "__main__":
    main()
