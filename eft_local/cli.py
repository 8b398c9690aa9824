"""The ``eft-local`` command: thin click code over the library."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, TextIO

import click

from .cli_rpc import rpc_option, rpc_server
from .engine import DEFAULT_CTX, EFT, Chunk, Completion
from .models import BASE_PROMPTS, delta_roles
from .errors import EFTError
from . import evaluate as ev
from .log import llama_log_scope, llama_logger
from .params import DEFAULTS
from .template import render_sample
from .text import replace_undecodable
from .vocab import check_vocabularies, read_vocab

# Like --verbose, and unexpected exceptions are re-raised with their traceback (for debugging).
DEBUG_ENV = "EFT_LOCAL_DEBUG"
VERBOSE = "eft_local.verbose"  # key in click's context meta, set by --verbose


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class UsageError(click.UsageError):
    """A usage error shown as one ``error: ...`` line (exit status 2)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _remember_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[VERBOSE] = True


VERBOSE_DECLS = ("--verbose", "-v")
VERBOSE_ATTRS: dict[str, Any] = dict(is_flag=True, expose_value=False, callback=_remember_verbose,
                                     help="Show llama.cpp's log and eft-local's debug messages on stderr.")
verbose_option = click.option(*VERBOSE_DECLS, **VERBOSE_ATTRS)


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
    """An integer for every model, or ``role=N`` pairs separated by commas."""

    name = "N|ROLE=N,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> int | dict[str, int]:
        if isinstance(value, (int, dict)):
            return value
        try:
            if "=" not in value:
                return int(value)
            pairs = (item.split("=", 1) for item in value.split(","))
            return {role.strip(): int(n) for role, n in pairs}
        except ValueError:
            self.fail(f"{value!r} is not an integer or a list like base=-1,tuned=0", param, ctx)


def model_options(f: Callable) -> Callable:
    """The three models: a recipe, explicit paths, or both (paths win)."""
    for decorator in reversed(
        [
            click.option("--recipe", help="Named model set (bundled, or from ~/.config/eft-local/recipes.toml; see `eft-local models`) [default: demo, the bundled triple]."),
            click.option("--base", "--model", "-m", "base", type=click.Path(dir_okay=False),
                         help="Large pre-trained model (GGUF): the model being steered."),
            click.option("--tuned", type=click.Path(dir_okay=False), help="Small fine-tuned model (GGUF)."),
            click.option("--reference", type=click.Path(dir_okay=False), help="The pre-trained model --tuned was fine-tuned from (GGUF)."),
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
    # Imported here: huggingface_hub is slow to import and only recipes need it.
    from .recipes import default_recipe, resolve

    models = {role: str(p) for role, p in resolve(recipe or default_recipe()).items()}
    return {**models, **explicit}


def check_base_path(base: str | None) -> None:
    """A recipe's name given as -m/--model (llama.cpp's spelling for the model file) is a
    usage error that names --recipe, not a missing file."""
    if base is None or os.path.exists(base) or os.path.basename(base) != base:
        return
    from .recipes import load_recipes

    try:
        names = load_recipes()
    except EFTError:
        return  # a broken recipes file is reported where recipes are used
    if base in names:
        raise UsageError(f"-m/--model takes the base model's GGUF file; for the recipe {base!r} use --recipe {base}")


def engine_options(f: Callable) -> Callable:
    """How the models are combined and run."""
    for decorator in reversed(
        [
            click.option("--weight", "-w", type=float, default=1.0, show_default=True, help="Weight of the fine-tuning delta (0: base model alone)."),
            click.option("--base-prompt", type=click.Choice(BASE_PROMPTS), default="same", show_default=True, help="same: every model sees the chat template; plain: base and reference see a plain transcript."),
            click.option("--ctx-size", "-c", type=int, default=DEFAULT_CTX, show_default=True, help="Context size per model (capped at each model's trained length)."),
            click.option("--threads", "-t", type=PerRole(), default=None, help="CPU threads per model, or per role: base=2,tuned=1 [default: all cores, split when concurrent]."),
            click.option("--gpu-layers", "--n-gpu-layers", "-ngl", "gpu_layers", type=PerRole(), default="0", show_default=True,
                         help="Layers to offload to the GPU per model (-1: all), or per role: base=-1,tuned=0."),
            click.option("--concurrent/--sequential", default=None, help="Run the three forward passes in threads or one after another [default: sequential]."),
            rpc_option,
        ]
    ):
        f = decorator(f)
    return f


speculative_option = click.option(
    "--speculative", metavar="K|auto|off", default=None,
    help="Speculative decoding: the tuned model drafts K tokens per verification ('auto' adapts K; 0 or 'off': "
         "plain decoding, the default). Same output distribution.")

system_option = click.option("--system", "--system-prompt", "-sys", "system", help="System message that starts the conversation.")


def sampling_options(f: Callable) -> Callable:
    """Sampling of the combined distribution, shared by generate and chat."""
    for decorator in reversed(
        [
            click.option("--temperature", "--temp", type=float, default=DEFAULTS.temperature, show_default=True, help="0 means greedy."),
            click.option("--top-k", type=int, default=DEFAULTS.top_k, show_default=True, help="0 disables."),
            click.option("--top-p", type=float, default=DEFAULTS.top_p, show_default=True, help="1 disables."),
            click.option("--min-p", type=float, default=DEFAULTS.min_p, show_default=True, help="0 disables."),
            click.option("--seed", "-s", type=int, default=None, help="Random seed (same seed, same output; -1: random)."),
            click.option("--max-tokens", "--n-predict", "-n", "max_tokens", type=int, default=DEFAULTS.max_tokens, show_default=True,
                         help="Most tokens to generate."),
            click.option("--stop", multiple=True, help="Stop at this string (repeatable); it is not printed."),
            speculative_option,
            click.option("--ignore-eos", is_flag=True, help="Never sample the end tokens (always --max-tokens tokens)."),
            click.option("--plausible-top-p", type=float, default=DEFAULTS.plausible_top_p, show_default=True,
                         help="Conservative decoding: only tokens inside this top-p nucleus of --plausible-model."),
            click.option("--plausible-min-p", type=float, default=DEFAULTS.plausible_min_p, show_default=True,
                         help="Conservative decoding: only tokens at least this times --plausible-model's top probability."),
            click.option("--plausible-model", type=click.Choice(["tuned", "base"]), default=DEFAULTS.plausible_model, show_default=True,
                         help="The model whose distribution decides what is plausible."),
        ]
    ):
        f = decorator(f)
    return f


def engine_kwargs(base_prompt: str, ctx_size: int, threads: int | dict[str, int] | None,
                  gpu_layers: int | dict[str, int], concurrent: bool | None, rpc: str | None = None) -> dict[str, Any]:
    """EFT keyword arguments from the engine options."""
    return dict(base_prompt=base_prompt, n_ctx=ctx_size, n_threads=threads, n_gpu_layers=gpu_layers,
                concurrent=concurrent, rpc=rpc)


def parse_delta(spec: str) -> tuple[str, str, float]:
    """``TUNED:REFERENCE[:WEIGHT]`` (weight 1 when left out).

    Paths may contain ':' (``C:\\models\\x.gguf``, ``./a:b.gguf``): the reading whose two paths
    are existing files wins; when no reading names two existing files, a ':' right after a
    drive letter belongs to its path and every other ':' separates.
    """
    found = set()
    for rest, weight in _weight_readings(spec):
        for i, char in enumerate(rest):
            if char == ":" and os.path.exists(rest[:i]) and os.path.exists(rest[i + 1:]):
                found.add((rest[:i], rest[i + 1:], weight))
    if len(found) == 1:
        return found.pop()
    if found:
        ways = " or ".join(f"{t!r} and {r!r} (weight {w:g})" for t, r, w in sorted(found))
        raise UsageError(f"--delta {spec!r} is ambiguous: it reads as {ways}")
    parts = split_at_colons(spec)
    weight = _number(parts[-1]) if len(parts) == 3 else 1.0
    if len(parts) in (2, 3) and parts[0] and parts[1] and weight is not None:
        return parts[0], parts[1], weight
    raise UsageError(f"--delta {spec!r} is not TUNED:REFERENCE[:WEIGHT] (WEIGHT a number; a path with ':' must exist)")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _weight_readings(spec: str) -> Iterator[tuple[str, float]]:
    """``spec`` without a weight, and split before a trailing ``:WEIGHT`` if it ends in one."""
    yield spec, 1.0
    rest, colon, last = spec.rpartition(":")
    weight = _number(last)
    if colon and weight is not None:
        yield rest, weight


def split_at_colons(spec: str) -> list[str]:
    """Split at every ':' but one after a drive letter (``C:\\`` or ``C:/`` starting a path)."""
    parts, start = [], 0
    for i, char in enumerate(spec):
        drive = i - start == 1 and spec[start].isascii() and spec[start].isalpha() and spec[i + 1:i + 2] in ("\\", "/")
        if char == ":" and not drive:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts


def model_set(recipe: str | None, base: str | None, tuned: str | None, reference: str | None,
              deltas: tuple[str, ...], weight: float = 1.0) -> tuple[str, list[tuple[str, str, float]]]:
    """The base path and the deltas: from --delta, else --tuned/--reference, else the recipe's."""
    if not deltas:
        models = resolve_models(recipe, base, tuned, reference)
        if tuned or reference:
            return models["base"], [(models["tuned"], models["reference"], weight)]
        from .recipes import default_recipe, get_recipe

        named = get_recipe(recipe or default_recipe()).deltas
        # --weight scales the recipe's first delta, as it does the one-delta form.
        pairs = [(models[t], models[r], w * (weight if i == 0 else 1.0)) for i, (t, r, w) in enumerate(named)]
        return models["base"], pairs
    check_base_path(base)
    if tuned or reference:
        raise UsageError("--delta replaces --tuned/--reference: give one form")
    parsed = [parse_delta(d) for d in deltas]
    if base is None:
        base = resolve_models(recipe, None, None, None)["base"]
    return base, parsed


def load(recipe: str | None, base: str | None, tuned: str | None, reference: str | None, deltas: tuple[str, ...],
         weight: float, parallel: int = 1, **engine: Any) -> EFT:
    base_path, pairs = model_set(recipe, base, tuned, reference, deltas, weight)
    return EFT(base_path, deltas=pairs, parallel=parallel, **engine_kwargs(**engine))


parallel_option = click.option(
    "--parallel", "-np", type=click.IntRange(1, 256), default=1, show_default=True,
    help="Sequences decoded together in one batch (slots); --ctx-size is split over them.")


SAMPLING_NAMES = ("temperature", "top_k", "top_p", "min_p", "seed", "max_tokens", "stop", "speculative", "ignore_eos",
                  "plausible_top_p", "plausible_min_p", "plausible_model")


def split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a command's keyword arguments into model-loading and sampling ones."""
    sampling = {k: kwargs.pop(k) for k in SAMPLING_NAMES}
    sampling["stop"] = [clean_arg(stop) for stop in sampling["stop"]]
    return kwargs, sampling


@click.group()
@click.version_option(package_name="eft-local")
def main() -> None:
    """Emulated fine-tuning: sample a large base model steered by a small fine-tuned one.

    log p = log p_base + weight * (log p_tuned - log p_reference), renormalised per token.
    """


UNDECODABLE = "the input held bytes that are not UTF-8; each was replaced with U+FFFD"


def clean_arg(text: str | None) -> str | None:
    """A text argument with undecodable bytes replaced by U+FFFD (and a warning)."""
    if text is None:
        return None
    text, replaced = replace_undecodable(text)
    if replaced:
        click.echo(f"warning: {UNDECODABLE}", err=True)
    return text


def read_prompt(prompt: str | None) -> str:
    """The PROMPT argument, or standard input when it is left out and something is piped.

    Bytes that are not UTF-8 become U+FFFD, with a warning, rather than a failure later.
    """
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("give a PROMPT or pipe one on standard input")
        # Read as bytes: Python's text reader would fail on them, or smuggle them in escaped.
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    prompt = clean_arg(prompt)
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


@main.command()
@click.argument("prompt", required=False)
@model_options
@engine_options
@sampling_options
@system_option
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@verbose_option
@handle_errors
def generate(prompt: str | None, system: str | None, raw: bool, as_json: bool, **kwargs: Any) -> None:
    """Reply to PROMPT (read from standard input when omitted)."""
    if raw and system is not None:
        raise UsageError("--system needs the chat template: leave out --raw, or write the system text into the prompt")
    prompt = read_prompt(prompt)
    system = clean_arg(system)
    engine_kw, sample_kw = split_options(kwargs)
    with load(**engine_kw) as eft:
        if system is None:
            chunks = eft.stream(prompt, raw=raw, **sample_kw)
        else:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            chunks = eft.stream(messages=messages, **sample_kw)
        if as_json:
            reply = Completion.from_chunks(chunks)
            result = {**dataclasses.asdict(reply), "usage": reply.usage}
            del result["logprobs"]
            click.echo(json.dumps(result, ensure_ascii=False))
        else:
            write_stream(chunks, sys.stdout)
            click.echo()


def write_stream(chunks: Iterable[Chunk], out: TextIO) -> str:
    """Print text pieces as they come; return the whole text."""
    parts = []
    for chunk in chunks:
        if chunk.text:
            out.write(chunk.text)
            out.flush()
            parts.append(chunk.text)
    return "".join(parts)


@main.command()
@model_options
@engine_options
@sampling_options
@system_option
@verbose_option
@handle_errors
def chat(system: str | None, **kwargs: Any) -> None:
    """Chat in the terminal: /reset clears the conversation, /exit (or Ctrl-D) leaves.

    Ctrl-C stops the reply in progress and keeps the conversation. At a terminal, lines can be
    edited and earlier ones recalled with the arrow keys (kept in memory only).
    """
    engine_kw, sample_kw = split_options(kwargs)
    system = clean_arg(system)
    # A line that is not UTF-8 arrives with its bytes escaped and is cleaned by the loop,
    # instead of raising inside input().
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    enable_line_editing()
    with load(**engine_kw) as eft:
        chat_loop(eft, sample_kw, system=system)


def enable_line_editing() -> None:
    """Line editing and history for ``input()`` at a terminal, as readline gives them.

    Importing the module is what switches it on; its history stays in memory (nothing calls
    ``write_history_file``). Piped input needs none of it, so readline is left alone there.
    """
    if not sys.stdin.isatty():
        return
    try:
        import readline  # noqa: F401
    except ImportError:  # Python built without it (Windows)
        pass


HELP = ("commands: /reset clears the conversation, /weight W sets the delta's weight, /delta N weight W "
        "sets delta N's, /exit leaves; Ctrl-C stops a reply")
LEAVE_HINT = "(to leave, type /exit or press Ctrl-D)"


class ChatInterrupts:
    """Chat's Ctrl-C: it stops what is armed (reading a line, a reply) and is ignored elsewhere.

    Installed as the SIGINT handler, so a KeyboardInterrupt is only ever raised inside the
    ``armed()`` blocks and never while the conversation itself is being updated.
    """

    def __init__(self) -> None:
        self._armed = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._armed = False  # a second Ctrl-C lands in the handler's cleanup unarmed
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    @contextlib.contextmanager
    def installed(self) -> Iterator["ChatInterrupts"]:
        """Handle SIGINT for the block (main thread only; elsewhere signals never arrive)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def chat_loop(eft: Any, sample_kw: dict[str, Any], *, system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO | None = None) -> list[dict[str, str]]:
    """Read a line, stream the reply, repeat. Returns the conversation when the user leaves.

    Ctrl-C stops a reply (the partial reply is kept) or, at the prompt, prints how to leave;
    anywhere else it is ignored, so the conversation is always whole. ``eft`` only needs
    ``stream_chat(messages, **options)``, so this runs without models in tests.
    """
    out = out or sys.stdout
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"Chatting. {HELP}.\n")
    with ChatInterrupts().installed() as interrupts:
        while True:
            try:
                with interrupts.armed():
                    line = read(">>> ")
            except EOFError:
                out.write("\n")
                return messages
            except KeyboardInterrupt:
                out.write(f"\n{LEAVE_HINT}\n")
                continue
            except UnicodeDecodeError:
                sys.stderr.write("warning: that line was not UTF-8 text and was ignored\n")
                continue
            line, replaced = replace_undecodable(line)
            if replaced:
                sys.stderr.write(f"warning: {UNDECODABLE}\n")
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                return messages
            if text == "/reset":
                messages = list(start)
                out.write("(conversation cleared)\n")
                continue
            if text.split()[0] in ("/weight", "/delta"):
                out.write(weight_command(eft, text) + "\n")
                continue
            if text.startswith("/"):
                out.write(f"unknown command {text.split()[0]}; {HELP}\n")
                continue
            turn = [*messages, {"role": "user", "content": line}]
            reply: list[str] = []
            stopped = False
            chunks = None
            try:
                with interrupts.armed():
                    chunks = eft.stream_chat(turn, **sample_kw)
                    for chunk in chunks:
                        if chunk.text:
                            out.write(chunk.text)
                            out.flush()
                            reply.append(chunk.text)
            except KeyboardInterrupt:
                stopped = True
            except EFTError as e:
                # A turn that cannot run (the context is full) does not end the session.
                sys.stderr.write(f"error: {e}; /reset starts a new conversation\n")
                continue
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()  # a stopped stream lets go of the models now, not when collected
            # The reply as shown, stopped or not, is what the next turn continues from.
            messages = [*turn, {"role": "assistant", "content": "".join(reply)}]
            out.write(" (stopped)\n" if stopped else "\n")


def weight_command(eft: Any, text: str) -> str:
    """Apply ``/weight W`` or ``/delta N weight W``; return the line to show."""
    try:
        index, value = parse_weight_command(text)
        weights = list(eft.weights)
        weights[index] = value
        eft.set_weights(weights)
        return f"(delta {index + 1} weight {value:g})"
    except EFTError as e:
        return f"error: {e}"
    except (ValueError, IndexError):
        return f"usage: /weight W or /delta N weight W, N from 1 to {len(eft.weights)}"


@main.command()
@click.argument("prompt", required=False)
@model_options
@engine_options
@sampling_options
@click.option("--reply", help="Score this reply instead of generating one.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list with every token's numbers.")
@verbose_option
@handle_errors
def explain(prompt: str | None, reply: str | None, raw: bool, as_json: bool, **kwargs: Any) -> None:
    """Show, token by token, what each model and the fine-tuning delta contributed to a reply.

    Columns: log p under each model, the delta term w * (log p_tuned - log p_reference), the
    combined probability, and the base model's own choice where it differs (marked *). Tokens
    the delta pushed up most are green, those it pushed down red.
    """
    prompt = read_prompt(prompt)
    engine_kw, sample_kw = split_options(kwargs)
    with load(**engine_kw) as eft:
        if reply is not None:
            # Scoring a given reply: only the plausibility filter shapes the distribution shown.
            sample_kw = {k: v for k, v in sample_kw.items() if k.startswith("plausible_")}
        rows = eft.explain(prompt, raw=raw, reply=clean_arg(reply), **sample_kw)
        roles = list(eft.models)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], ensure_ascii=False))
        return
    click.echo(explain_table(rows, roles))


def explain_table(rows: list, roles: list[str]) -> str:
    """The coloured terminal view of ``explain``."""
    head = f"{'token':<16}" + "".join(f"{r:>11}" for r in roles) + f"{'delta':>9}{'p(EFT)':>8}  base's choice"
    lines = [head]
    for r in rows:
        delta = sum(r.delta_terms)
        cells = f"{r.text!r:<16.16}" + "".join(f"{r.logprobs[role]:>11.2f}" for role in roles)
        shown = f"{delta:>+9.2f}"
        if delta > 1:
            shown = click.style(shown, fg="green", bold=True)
        elif delta < -1:
            shown = click.style(shown, fg="red")
        choice = f"* {r.base_top_text!r}" if r.base_would_differ else ""
        lines.append(f"{cells}{shown}{r.combined_prob:>8.3f}  {choice}")
    return "\n".join(lines)


def parse_weight_command(text: str) -> tuple[int, float]:
    """``/weight W`` (the first delta) or ``/delta N weight W``: (0-based delta index, weight)."""
    words = text.split()
    if words[0] == "/weight" and len(words) == 2:
        return 0, float(words[1])
    if words[0] == "/delta" and len(words) == 4 and words[2] == "weight" and int(words[1]) >= 1:
        return int(words[1]) - 1, float(words[3])
    raise ValueError(text)


@main.command()
@model_options
@verbose_option
@handle_errors
def check(recipe: str | None, base: str | None, tuned: str | None, reference: str | None,
          deltas: tuple[str, ...]) -> None:
    """Check that the models share one vocabulary and that the tuned model's chat template renders.

    Reads headers only: no weights are loaded.
    """
    base_path, pairs = model_set(recipe, base, tuned, reference, deltas)
    infos = {"base": read_vocab(base_path)}
    for i, (t, r, _) in enumerate(pairs, 1):
        tuned_role, reference_role = delta_roles(i)
        infos[tuned_role], infos[reference_role] = read_vocab(t), read_vocab(r)
    for role, v in infos.items():
        click.echo(
            f"{role:<10} {v.path}\n"
            f"{'':<10} {v.architecture}, {v.tokenizer_model} tokenizer, {v.n_vocab} tokens, "
            f"bos {v.bos_id}, eos {v.eos_id}, add_bos {v.add_bos}, "
            f"chat template {'yes' if v.chat_template else 'no'}"
        )
    # The notes are part of this report, on standard output, rather than warnings.
    report = check_vocabularies(infos, log_notes=False)
    for note in report.notes:
        click.echo(f"note: {note}")
    if not infos["tuned"].chat_template:
        click.echo("note: the tuned model has no chat template; chats use a plain transcript")
    else:
        # The template is code from the model file: a broken or hostile one fails here, with
        # the same renderer and limits as a chat, instead of at the first chat.
        render_sample(infos["tuned"])
    click.echo(f"compatible: {report.n_shared} shared token ids")


@main.command(name="eval")
@click.argument("data", type=click.Path(dir_okay=False))
@model_options
@engine_options
@click.option("--config", "configs", multiple=True, metavar="SPEC",
              help="A configuration to run (repeatable): a model name (base, tuned, reference, oracle, ...) or "
                   "path alone; eft or eft@W for the triple; LABEL=BASE,TUNED,REFERENCE[,W] for any triple. "
                   "[default: base, tuned, eft]")
@click.option("--max-tokens", "--n-predict", "-n", "max_tokens", type=int, default=32, show_default=True, help="Most tokens per reply.")
@click.option("--max-words", type=int, default=ev.MAX_WORDS, show_default=True, help="Longest reply that still counts as a short answer.")
@click.option("--limit", type=int, default=None, help="Use only the first N items.")
# Output paths are checked by eval itself, for a one-line error before any model loads.
@click.option("--output", "-o", type=click.Path(), help="Write results to a .json (with every reply) or .csv file, "
              "rewritten as each configuration finishes.")
@click.option("--plot", type=click.Path(), help="Write a PNG bar chart (needs matplotlib).")
@click.option("--match", metavar="REGEX", help="Also report the share of replies this regular expression matches.")
@speculative_option
@parallel_option
@verbose_option
@handle_errors
def eval_command(data: str, recipe: str | None, base: str | None, tuned: str | None, reference: str | None,
                 deltas: tuple[str, ...], weight: float, configs: tuple[str, ...], max_tokens: int, max_words: int, limit: int | None,
                 output: str | None, plot: str | None, match: str | None, speculative: str | None, parallel: int,
                 **engine: Any) -> None:
    """Score configurations on DATA, a JSONL file of {"prompt", "answer"} lines (greedy replies).

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
    for path in (output, plot):
        if path and os.path.exists(path) and os.path.exists(data) and os.path.samefile(path, data):
            raise EFTError(f"cannot write {path}: it is the data file")
    if deltas:
        raise UsageError("eval takes one delta per configuration: use --config LABEL=BASE,TUNED,REFERENCE[,W]")
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


@main.command()
@model_options
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--queue", type=click.IntRange(0, 4096), default=16, show_default=True,
              help="Requests that may wait for the model; beyond them the server answers 503.")
@click.option("--api-key", envvar="EFT_LOCAL_API_KEY", help="Require 'Authorization: Bearer KEY' [env: EFT_LOCAL_API_KEY].")
@parallel_option
@verbose_option
@handle_errors
def serve(host: str, port: int, queue: int, api_key: str | None, **kwargs: Any) -> None:
    """Serve the OpenAI HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

    Needs the server extra: pip install 'eft-local[server]'.
    """
    try:
        import uvicorn

        from .server import create_app
    except ImportError:
        raise EFTError("serve needs the server extra: pip install 'eft-local[server]'") from None
    check_port(host, port)
    name = served_name(kwargs["recipe"], kwargs["base"])
    with load(**kwargs) as eft:
        app = create_app(eft, model=name, queue=queue, api_key=api_key, parallel=eft.parallel)
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
    from .recipes import default_recipe

    return recipe or default_recipe()


def check_port(host: str, port: int) -> None:
    """Fail with one line before loading models when the address cannot be listened on."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as e:
        raise EFTError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


# Registered last: cli_models imports handle_errors from this module.
from .cli_models import models, pull  # noqa: E402

for command in (pull, models, rpc_server):
    command.params.append(click.Option(VERBOSE_DECLS, **VERBOSE_ATTRS))
    main.add_command(command)
