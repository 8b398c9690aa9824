"""The ``eft-local`` command: thin click code over the library, one module per command group."""

from __future__ import annotations

import click

from .chat import chat
from .evaluate import eval_command
from .generate import check, explain, generate
from .hub import models, pull
from .rpc import rpc_server
from .serve import serve


@click.group()
@click.version_option(package_name="eft-local")
def main() -> None:
    """Emulated fine-tuning: sample a large base model steered by a small fine-tuned one.

    log p = log p_base + weight * (log p_tuned - log p_reference), renormalised per token.
    """


for command in (generate, chat, explain, check, eval_command, serve, pull, models, rpc_server):
    main.add_command(command)
