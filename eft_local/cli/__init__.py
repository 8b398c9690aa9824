"""The ``eft-local`` command: thin click code over the library, one module per command group."""

from __future__ import annotations

import sys
from typing import Any

import click

from .chat import chat
from .evaluate import eval_command
from .generate import check, explain, generate
from .hub import models, pull
from .rpc import rpc_server
from .serve import serve


class Group(click.Group):
    """The command group: a usage error is one ``error: ...`` line and exit status 2, every other
    error (the commands' own, ``handle_errors``) one line and status 1."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C or end of input at one of click's own prompts
            click.echo("", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


# -h as llama.cpp's tools spell it; every command inherits it.
@click.group(cls=Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="eft-local")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Emulated fine-tuning: sample a large base model steered by a small fine-tuned one.

    log p = log p_base + weight * (log p_tuned - log p_reference), renormalised per token.
    """
    if ctx.invoked_subcommand is None:  # eft-local alone: its help, as a question answered
        click.echo(ctx.get_help())


for command in (generate, chat, explain, check, eval_command, serve, pull, models, rpc_server):
    main.add_command(command)
