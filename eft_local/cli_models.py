"""``eft-local pull`` and ``eft-local models``: recipes from the command line.

The main group in ``cli.py`` registers these commands with ``main.add_command``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from . import recipes as rc


def _handle_errors(f: Callable) -> Callable:
    """``cli.handle_errors``, looked up when the command runs.

    Importing ``cli`` here at import time would be circular: ``cli`` imports this module to
    register the commands, and either module may be imported first.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .cli import handle_errors

        return handle_errors(f)(*args, **kwargs)

    return wrapper


@click.command()
@click.argument("recipe")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_handle_errors
def pull(recipe: str, quiet: bool) -> None:
    """Download the models of RECIPE into the Hugging Face cache and print their paths.

    Files already downloaded are not fetched again; an interrupted download resumes where it
    stopped; each new file is checked against the size and sha256 the hub reports. See `eft-local models` for the recipes.
    """
    paths = rc.pull(recipe, progress=not quiet)
    for role, path in paths.items():
        click.echo(f"{role:<10} {path}")


@click.command()
@_handle_errors
def models() -> None:
    """List the recipes: their models and whether each is present locally."""
    recipes = rc.load_recipes()
    root = rc.models_dir()
    width = max(len(rc.describe(ref, root)) for r in recipes.values() for ref in r.models.values())
    for recipe in recipes.values():
        tags = [t for t, on in (("default", recipe.default), ("unverified", not recipe.verified)) if on]
        head = f"{recipe.name}{' (' + ', '.join(tags) + ')' if tags else ''}"
        click.echo(f"{head}: {recipe.description}" if recipe.description else head)
        present = rc.status(recipe)
        for role, ref in recipe.models.items():
            if present[role]:
                state = "present"
            else:
                state = "not downloaded" if ref.on_hub else "missing"
            click.echo(f"  {role:<10} {rc.describe(ref, root):<{width}}  {state}")
    click.echo(f"\nrecipes: {root / rc.RECIPES_FILE}; hub cache: {rc.hub_cache_dir()}")
