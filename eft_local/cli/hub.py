"""``eft-local pull`` and ``eft-local models``: recipes from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from ..hub import recipes as rc
from .common import handle_errors, verbose_option, verbose_requested


@click.command()
@click.argument("recipe")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@verbose_option
@handle_errors
def pull(recipe: str, quiet: bool) -> None:
    """Download the models of RECIPE into the Hugging Face cache and print their paths.

    Files already downloaded are not fetched again; an interrupted download resumes where it
    stopped; each new file is checked against the size and sha256 the hub reports. See `eft-local models` for the recipes.
    """
    with rc.quiet_hub(verbose_requested()):
        paths = rc.pull(recipe, progress=not quiet)
    for role, path in paths.items():
        click.echo(f"{role:<10} {path}")


@click.command()
@verbose_option
@handle_errors
def models() -> None:
    """List the recipes: where each comes from, its models and whether each is present locally.

    Recipes come from recipes.toml in the models folder and from your own recipes.toml in the
    config folder (~/.config/eft-local/); one of yours with a bundled recipe's name replaces it.
    """
    recipes = rc.load_recipes()
    root, overlay = rc.models_dir(), rc.overlay_file()
    bundled = rc.load_recipes(root / rc.RECIPES_FILE)

    def folder(recipe: rc.Recipe) -> Path:
        # Local paths show relative to the file that names them.
        return recipe.source.parent if recipe.source is not None else root

    width = max(len(rc.describe(ref, folder(r))) for r in recipes.values() for ref in r.models.values())
    for recipe in recipes.values():
        yours = overlay is not None and recipe.source == overlay
        tags = [t for t, on in (("default", recipe.default), ("unverified", not recipe.verified),
                                ("yours", yours), ("replaces the bundled one", yours and recipe.name in bundled)) if on]
        head = f"{recipe.name}{' (' + ', '.join(tags) + ')' if tags else ''}"
        click.echo(f"{head}: {recipe.description}" if recipe.description else head)
        present = rc.status(recipe)
        for role, ref in recipe.models.items():
            if present[role]:
                state = "present"
            else:
                state = "not downloaded" if ref.on_hub else "missing"
            click.echo(f"  {role:<10} {rc.describe(ref, folder(recipe)):<{width}}  {state}")
    where = "bundled recipes:" if root == rc.DEFAULT_MODELS_DIR else f"recipes (${rc.MODELS_DIR_ENV}):"
    lines = [(where, str(root / rc.RECIPES_FILE))]
    if overlay is not None:
        mine = sum(r.source == overlay for r in recipes.values())
        note = f"{mine} recipe{'s' if mine != 1 else ''}" if overlay.is_file() else "none yet"
        lines.append(("your recipes:", f"{overlay} ({note})"))
    lines.append(("hub cache:", str(rc.hub_cache_dir())))
    click.echo()
    for label, value in lines:
        click.echo(f"{label:<{max(len(x) for x, _ in lines)}} {value}")
