"""What every command shares: errors as one line, logging on stderr, and option groups."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
from typing import Any, Callable, Iterator

import click

from ..core.deltas import Delta, parse_delta
from ..core.errors import EFTError
from ..core.params import FIELDS, cli_fields
from ..core.text import replace_undecodable
from ..engine.eft import DEFAULT_CTX, EFT
from ..engine.model_set import BASE_PROMPTS, max_threads
from ..hub.recipes import default_recipe, load_recipes, recipe_models, resolve
from ..runtime.log import llama_log_scope, llama_logger

# Like --verbose, and unexpected exceptions are re-raised with their traceback (for debugging).
DEBUG_ENV = "EFT_LOCAL_DEBUG"
VERBOSE = "eft_local.verbose"  # key in click's context meta, set by --verbose


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _remember_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[VERBOSE] = True


verbose_option = click.option("--verbose", "-v", is_flag=True, expose_value=False, callback=_remember_verbose,
                              help="Show llama.cpp's log and eft-local's debug messages on stderr.")


class StderrLog(logging.Handler):
    """eft-local's log on stderr: each warning once, as one ``warning: ...`` line; with
    --verbose also debug messages and llama.cpp's own lines, as llama.cpp wrote them."""

    def __init__(self, verbose: bool) -> None:
        super().__init__(logging.DEBUG if verbose else logging.WARNING)
        self.verbose = verbose
        self._shown: set[tuple[int, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = " ".join(record.getMessage().splitlines())
            if record.name == llama_logger.name or record.name.startswith(llama_logger.name + "."):
                if self.verbose:
                    click.echo(message, err=True)
                return
            # Loading the same models again (eval's configurations) repeats their notes.
            if (record.levelno, message) not in self._shown:
                self._shown.add((record.levelno, message))
                click.echo(f"{record.levelname.lower()}: {message}", err=True)
        except Exception:  # noqa: BLE001 - logging's own policy for a failing handler
            self.handleError(record)


@contextlib.contextmanager
def stderr_logging(verbose: bool) -> Iterator[None]:
    """For one command: the ``eft_local`` log on stderr, llama.cpp's log routed to it."""
    logger = logging.getLogger("eft_local")
    handler = StderrLog(verbose)
    level = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.addHandler(handler)
    try:
        # The whole command is eft-local's: every llama.cpp message in it is ours to route.
        with llama_log_scope():
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def verbose_requested() -> bool:
    """Whether this command runs verbose: --verbose/-v, or EFT_LOCAL_DEBUG set."""
    ctx = click.get_current_context(silent=True)
    return bool(os.environ.get(DEBUG_ENV)) or bool(ctx is not None and ctx.meta.get(VERBOSE))


def handle_errors(f: Callable) -> Callable:
    """Turn library errors into ``error: ...`` on stderr and exit status 1, never a traceback.

    The command runs with eft-local's log on stderr (see ``stderr_logging``).
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with stderr_logging(verbose_requested()):
                return f(*args, **kwargs)
        except EFTError as e:
            fail(str(e))
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except BrokenPipeError:
            # The reader went away (eft-local ... | head): stop quietly, as Unix tools do, and
            # point stdout at devnull so the flush at interpreter exit cannot fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - the CLI promises no tracebacks
            if os.environ.get(DEBUG_ENV):
                raise
            fail(f"{type(e).__name__}: {e}")

    return wrapper


class PerRole(click.ParamType):
    """An integer for every model, or ``role=N`` pairs separated by commas, each from ``low`` to
    ``high`` (a value out of range is a usage error)."""

    name = "N|ROLE=N,..."

    def __init__(self, low: int, high: int | None = None):
        self.low, self.high = low, high

    def convert(self, value: Any, param: Any, ctx: Any) -> int | dict[str, int]:
        if isinstance(value, (int, dict)):
            return value
        try:
            if "=" not in value:
                parsed: int | dict[str, int] = int(value)
            else:
                pairs = (item.split("=", 1) for item in value.split(","))
                parsed = {role.strip(): int(n) for role, n in pairs}
        except ValueError:
            self.fail(f"{value!r} is not an integer or a list like base=-1,tuned=0", param, ctx)
        for n in parsed.values() if isinstance(parsed, dict) else [parsed]:
            if n < self.low or (self.high is not None and n > self.high):
                bound = f"from {self.low} to {self.high}" if self.high is not None else f"at least {self.low}"
                self.fail(f"{n} is not {bound}", param, ctx)
        return parsed


def model_options(f: Callable) -> Callable:
    """The three models: a recipe, explicit paths, or both (paths win)."""
    for decorator in reversed(
        [
            click.option("--recipe", help="Named model set (bundled, or from ~/.config/eft-local/recipes.toml; see `eft-local models`) [default: demo, the bundled triple]."),
            # Plain paths: what is wrong with a file (missing, a directory, not GGUF) is the loader's one line.
            click.option("--base", "--model", "-m", "base", type=click.Path(),
                         help="Large pre-trained model (GGUF): the model being steered."),
            click.option("--tuned", type=click.Path(), help="Small fine-tuned model (GGUF)."),
            click.option("--reference", type=click.Path(), help="The pre-trained model --tuned was fine-tuned from (GGUF)."),
            click.option("--delta", "-d", "deltas", multiple=True, metavar="TUNED:REFERENCE[:WEIGHT]",
                         help="A fine-tuning delta (repeatable); replaces --tuned/--reference/--weight."),
        ]
    ):
        f = decorator(f)
    return f


def resolve_models(recipe: str | None, base: str | None, tuned: str | None, reference: str | None) -> dict[str, str]:
    """Paths of the models to use: explicit paths, the rest from the recipe (default: demo)."""
    check_base_path(base)
    explicit = {role: p for role, p in (("base", base), ("tuned", tuned), ("reference", reference)) if p}
    if len(explicit) == 3 and recipe is None:
        return explicit
    models = {role: str(p) for role, p in resolve(recipe or default_recipe()).items()}
    return {**models, **explicit}


def check_base_path(base: str | None) -> None:
    """A recipe's name given as -m/--model (llama.cpp's spelling for the model file) is a
    usage error that names --recipe, not a missing file."""
    if base is None or os.path.exists(base) or os.path.basename(base) != base:
        return
    try:
        names = load_recipes()
    except EFTError:
        return  # a broken recipes file is reported where recipes are used
    if base in names:
        raise click.UsageError(f"-m/--model takes the base model's GGUF file; for the recipe {base!r} use --recipe {base}")


def engine_options(f: Callable) -> Callable:
    """How the models are combined and run."""
    for decorator in reversed(
        [
            click.option("--weight", "-w", type=float, default=1.0, show_default=True, help="Weight of the fine-tuning delta (0: base model alone)."),
            click.option("--base-prompt", type=click.Choice(BASE_PROMPTS), default="same", show_default=True, help="same: every model sees the chat template; plain: base and reference see a plain transcript."),
            click.option("--ctx-size", "-c", type=int, default=DEFAULT_CTX, show_default=True, help="Context size per model (capped at each model's trained length)."),
            click.option("--threads", "-t", type=PerRole(1, max_threads()), default=None, help="CPU threads per model, or per role: base=2,tuned=1 [default: all cores, split when concurrent]."),
            click.option("--gpu-layers", "--n-gpu-layers", "-ngl", "gpu_layers", type=PerRole(-1), default="0", show_default=True,
                         help="Layers to offload to the GPU per model (-1: all), or per role: base=-1,tuned=0."),
            click.option("--concurrent/--sequential", default=None, help="Run the three forward passes in threads or one after another [default: sequential]."),
            click.option("--rpc", metavar="HOST:PORT[,HOST:PORT...]", default=None,
                         help="Put the base model's layers on these llama.cpp RPC servers (eft-local rpc-server); "
                              "--gpu-layers base=N says how many [default: all]."),
        ]
    ):
        f = decorator(f)
    return f


system_option = click.option("--system", "--system-prompt", "-sys", "system", help="System message that starts the conversation.")


def sampling_options(*names: str, **overrides: dict[str, Any]) -> Callable[[Callable], Callable]:
    """The command-line options of SamplingParams' fields (``names``; none: every field with
    flags), each declared by its field: flags, default, help. ``overrides`` changes a field's
    click settings for one command (eval's own default and help for --max-tokens)."""
    chosen = [f for f in cli_fields() if not names or f.name in names]

    def decorate(command: Callable) -> Callable:
        for f in reversed(chosen):
            command = _option(f, **overrides.get(f.name, {}))(command)
        return command

    return decorate


def _option(field: dataclasses.Field, **override: Any) -> Callable:
    attrs = {"default": field.default, "help": field.metadata["help"], **field.metadata["cli"], **override}
    choices = attrs.pop("choices", None)
    one_value = not attrs.get("is_flag") and not attrs.get("multiple")
    if choices:
        attrs["type"] = click.Choice(choices)
    elif one_value and attrs["default"] is not None:
        attrs.setdefault("type", type(attrs["default"]))
    attrs.setdefault("show_default", one_value and attrs["default"] is not None)
    return click.option(*field.metadata["flags"], field.name, **attrs)


def engine_kwargs(base_prompt: str, ctx_size: int, threads: int | dict[str, int] | None,
                  gpu_layers: int | dict[str, int], concurrent: bool | None, rpc: str | None = None) -> dict[str, Any]:
    """EFT keyword arguments from the engine options."""
    return dict(base_prompt=base_prompt, n_ctx=ctx_size, n_threads=threads, n_gpu_layers=gpu_layers,
                concurrent=concurrent, rpc=rpc)


def chosen_models(recipe: str | None, base: str | None, tuned: str | None, reference: str | None,
                  deltas: tuple[str, ...], weight: float = 1.0) -> tuple[str, list[Delta]]:
    """The base path and the deltas: from --delta, else --tuned/--reference, else the recipe's
    (-m/--model replacing its base)."""
    check_base_path(base)
    if deltas:
        if tuned or reference:
            raise click.UsageError("--delta replaces --tuned/--reference: give one form")
        try:
            parsed = [parse_delta(d) for d in deltas]
        except EFTError as e:
            raise click.UsageError(str(e)) from None
        return base or str(recipe_models(recipe)[0]), parsed
    if tuned or reference:
        models = resolve_models(recipe, base, tuned, reference)
        return models["base"], [Delta(models["tuned"], models["reference"], weight)]
    recipe_base, named = recipe_models(recipe)
    # --weight scales the recipe's first delta, as it does the one-delta form.
    return base or str(recipe_base), [d._replace(weight=d.weight * weight) if i == 0 else d
                                      for i, d in enumerate(named)]


def load(recipe: str | None, base: str | None, tuned: str | None, reference: str | None, deltas: tuple[str, ...],
         weight: float, parallel: int = 1, **engine: Any) -> EFT:
    base_path, pairs = chosen_models(recipe, base, tuned, reference, deltas, weight)
    return EFT(base_path, deltas=pairs, parallel=parallel, **engine_kwargs(**engine))


parallel_option = click.option(
    "--parallel", "-np", type=click.IntRange(1, 256), default=1, show_default=True,
    help="Sequences decoded together in one batch (slots); --ctx-size is split over them.")


def split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a command's keyword arguments into model-loading and sampling ones (text from the
    command line cleaned of undecodable bytes)."""
    sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in FIELDS}
    for k, v in sampling.items():
        if isinstance(v, tuple) and all(isinstance(x, str) for x in v):
            sampling[k] = [clean_arg(x) for x in v]
    return kwargs, sampling


UNDECODABLE = "the input held bytes that are not UTF-8; each was replaced with U+FFFD"


def clean_arg(text: str | None) -> str | None:
    """A text argument with undecodable bytes replaced by U+FFFD (and a warning)."""
    if text is None:
        return None
    text, replaced = replace_undecodable(text)
    if replaced:
        click.echo(f"warning: {UNDECODABLE}", err=True)
    return text


def prompt_options(f: Callable) -> Callable:
    """The prompt: the PROMPT argument, -p/--prompt or -f/--file (llama.cpp's), or standard input."""
    for decorator in reversed([
        click.argument("prompt", required=False),
        click.option("--prompt", "-p", "prompt_text", metavar="TEXT", help="The prompt (instead of PROMPT)."),
        click.option("--file", "-f", "prompt_file", type=click.Path(allow_dash=True), help="Read the prompt from this file ('-': standard input)."),
    ]):
        f = decorator(f)
    return f


def read_prompt(prompt: str | None, prompt_text: str | None = None, prompt_file: str | None = None) -> str:
    """The prompt from PROMPT, -p or -f (one of them), or standard input when none is given and
    something is piped.

    Bytes that are not UTF-8 become U+FFFD, with a warning, rather than a failure later.
    """
    given = [x for x in (prompt, prompt_text, prompt_file) if x is not None]
    if len(given) > 1:
        raise click.UsageError("give the prompt once: as PROMPT, with -p/--prompt or with -f/--file")
    prompt = given[0] if given else None
    if prompt_file is not None and prompt_file != "-":
        try:
            with open(prompt_file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise EFTError(f"cannot read {prompt_file}: {e.strerror or e}") from None
        prompt = raw.decode("utf-8", errors="surrogateescape")
    elif prompt is None or prompt_file == "-":
        if prompt_file is None and sys.stdin.isatty():
            raise click.UsageError("give a PROMPT (or -p TEXT, -f FILE) or pipe one on standard input")
        # Read as bytes: Python's text reader would fail on them, or smuggle them in escaped.
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    prompt = clean_arg(prompt)
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    return prompt
