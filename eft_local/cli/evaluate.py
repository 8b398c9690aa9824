"""``eft-local eval``: score configurations on a data set."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..core.errors import EFTError
from ..evaluation import evaluate as ev
from ..hub.recipes import data_file
from .common import (engine_kwargs, engine_options, handle_errors, model_options, parallel_option,
                     resolve_models, sampling_options, verbose_option)


@click.command(name="eval")
@click.argument("data")
@model_options
@engine_options
@click.option("--config", "configs", multiple=True, metavar="SPEC",
              help="A configuration to run (repeatable): a model name (base, tuned, reference, oracle, ...) or "
                   "path alone; eft or eft@W for the triple; LABEL=BASE,TUNED,REFERENCE[,W] for any triple. "
                   "[default: base, tuned, eft]")
@click.option("--max-words", type=int, default=ev.MAX_WORDS, show_default=True, help="Longest reply that still counts as a short answer.")
@click.option("--limit", type=int, default=None, help="Use only the first N items.")
# Output paths are checked by eval itself, for a one-line error before any model loads.
@click.option("--output", "-o", type=click.Path(), help="Write results to a .json (with every reply) or .csv file, "
              "rewritten as each configuration finishes.")
@click.option("--plot", type=click.Path(), help="Write a PNG bar chart (needs matplotlib).")
@click.option("--match", metavar="REGEX", help="Also report the share of replies this regular expression matches.")
@sampling_options("max_tokens", "speculative", max_tokens=dict(default=32, help="Most tokens per reply."))
@parallel_option
@verbose_option
@handle_errors
def eval_command(data: str, recipe: str | None, base: str | None, tuned: str | None, reference: str | None,
                 deltas: tuple[str, ...], weight: float, configs: tuple[str, ...], max_tokens: int, max_words: int, limit: int | None,
                 output: str | None, plot: str | None, match: str | None, speculative: str | None, parallel: int,
                 **engine: Any) -> None:
    """Score configurations on DATA, a JSONL file of {"prompt", "answer"} lines (greedy replies),
    or a bundled set by name (demo/heldout, demo/finetuned).

    Format following: the reply ends its turn by itself within --max-words words. Factual
    accuracy: the reference answer appears in the reply.
    """
    if max_tokens < 1 or max_words < 1 or (limit is not None and limit < 1):
        raise EFTError("--max-tokens, --max-words and --limit must be at least 1")
    # The output paths are checked before anything loads: a long run must not end unable to save.
    if output:
        ev.check_output(output, (".json", ".csv"))
    if plot:
        ev.check_plot(plot)
    data = str(data_file(data))
    for path in (output, plot):
        if path and os.path.exists(path) and os.path.exists(data) and os.path.samefile(path, data):
            raise EFTError(f"cannot write {path}: it is the data file")
    if deltas:
        raise click.UsageError("eval takes one delta per configuration: use --config LABEL=BASE,TUNED,REFERENCE[,W]")
    ev.compile_match(match)  # a bad pattern fails before the models load
    items = ev.load_items(data)[:limit]
    models = resolve_models(recipe, base, tuned, reference)
    specs = [ev.parse_config(spec, models, weight) for spec in (configs or ("base", "tuned", "eft"))]
    run = ev.Run(len(items), output, match)

    def keep() -> tuple[list[str], list[str]]:
        # A run that stops early still saves and shows what finished: files first, as printing
        # can fail too (a closed pipe).
        written, problems = run.keep(plot)
        done = run.finished()
        if done:
            click.echo(ev.table(done))
        return written, problems

    try:
        for config in specs:
            run.start(config.label)
            with click.progressbar(length=len(items), label=config.label, file=sys.stderr) as bar:

                def on_item(item: ev.ItemResult) -> None:
                    run.add(item)
                    bar.update(1)

                result = ev.evaluate(config, items, max_tokens=max_tokens, max_words=max_words,
                                     engine_options={**engine_kwargs(**engine), "parallel": parallel},
                                     speculative=speculative, match=match,
                                     on_item=on_item)
            run.finish(result)  # rewrites --output with every finished configuration
    except KeyboardInterrupt:
        written, problems = keep()
        note = f"interrupted: {run.describe()}"
        if written:
            note += f", saved to {', '.join(written)}"
        click.echo("; ".join([note, *problems]), err=True)
        sys.exit(130)
    except Exception as e:
        written, problems = keep()
        if problems:
            message = str(e) if isinstance(e, EFTError) else f"{type(e).__name__}: {e}"
            raise EFTError("; ".join([message, *problems])) from e
        raise
    click.echo(ev.table(run.results))
    if plot:
        ev.plot(run.results, plot)


