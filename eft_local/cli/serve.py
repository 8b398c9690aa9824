"""``eft-local serve``: the OpenAI HTTP API."""

from __future__ import annotations

import os
import signal
from typing import Any

import click

from ..core.errors import EFTError
from ..core.net import listen_address
from ..core.params import SamplingParams
from ..hub.recipes import default_recipe
from .common import (engine_options, handle_errors, load, model_options, parallel_option, sampling_options,
                     split_options, verbose_option)


@click.command()
@model_options
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--queue", type=click.IntRange(0, 4096), default=16, show_default=True,
              help="Requests that may wait for the model; beyond them the server answers 503.")
@click.option("--api-key", envvar="EFT_LOCAL_API_KEY", help="Require 'Authorization: Bearer KEY' [env: EFT_LOCAL_API_KEY].")
@sampling_options()
@parallel_option
@verbose_option
@handle_errors
def serve(host: str, port: int, queue: int, api_key: str | None, **kwargs: Any) -> None:
    """Serve the OpenAI HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

    The sampling options are the defaults of requests that leave them out; --context-shift lets
    an over-long chat leave out its oldest turns instead of answering 400. Needs the server
    extra: pip install 'eft-local[server]'.
    """
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError:
        raise EFTError("serve needs the server extra: pip install 'eft-local[server]'") from None
    listen_address(host, port)  # one line now, not after the models load
    engine_kw, sample_kw = split_options(kwargs)
    defaults = SamplingParams.create(**sample_kw)
    name = served_name(engine_kw["recipe"], engine_kw["base"])
    with load(**engine_kw) as eft:
        app = create_app(eft, model=name, queue=queue, api_key=api_key, parallel=eft.parallel, defaults=defaults)
        click.echo(f"serving {name} on http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with the
        # handlers it found: this one makes SIGTERM, like Ctrl-C, end with status 0.
        previous = signal.signal(signal.SIGTERM, stopped)
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        finally:
            signal.signal(signal.SIGTERM, previous)
    click.echo("stopped", err=True)


def stopped(signum: int, frame: Any) -> None:
    """SIGTERM after the server has shut down: leave normally."""
    raise SystemExit(0)


def served_name(recipe: str | None, base: str | None) -> str:
    """The model id the server answers to: the recipe's name, or the base file's."""
    if base is not None and recipe is None:
        return os.path.splitext(os.path.basename(base))[0]
    return recipe or default_recipe()
