"""``eft-local generate``, ``explain`` and ``check``: one prompt, one reply, one report."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Iterable, TextIO

import click

from ..chat.template import render_sample
from ..core.deltas import role_names
from ..engine.results import Chunk, Completion
from ..runtime.vocab import check_vocabularies, read_vocab
from .common import (chosen_models, clean_arg, engine_options, handle_errors, load, model_options,
                     prompt_options, read_prompt, sampling_options, split_options, system_option, verbose_option)


@click.command()
@prompt_options
@model_options
@engine_options
@sampling_options()
@system_option
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@verbose_option
@handle_errors
def generate(prompt: str | None, prompt_text: str | None, prompt_file: str | None, system: str | None, raw: bool,
             as_json: bool, **kwargs: Any) -> None:
    """Reply to PROMPT (or -p TEXT, -f FILE; read from standard input when omitted)."""
    if raw and system is not None:
        raise click.UsageError("--system needs the chat template: leave out --raw, or write the system text into the prompt")
    prompt = read_prompt(prompt, prompt_text, prompt_file)
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


@click.command()
@prompt_options
@model_options
@engine_options
@sampling_options()
@click.option("--reply", help="Score this reply instead of generating one.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list with every token's numbers.")
@verbose_option
@handle_errors
def explain(prompt: str | None, prompt_text: str | None, prompt_file: str | None, reply: str | None, raw: bool,
            as_json: bool, **kwargs: Any) -> None:
    """Show, token by token, what each model and the fine-tuning delta contributed to a reply.

    Columns: log p under each model, the delta term w * (log p_tuned - log p_reference), the
    combined probability, and the base model's own choice where it differs (marked *). Tokens
    the delta pushed up most are green, those it pushed down red.
    """
    prompt = read_prompt(prompt, prompt_text, prompt_file)
    engine_kw, sample_kw = split_options(kwargs)
    with load(**engine_kw) as eft:
        rows = eft.explain(prompt, raw=raw, reply=clean_arg(reply), **sample_kw)
        roles = list(eft.model_set.by_role)
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


@click.command()
@model_options
@verbose_option
@handle_errors
def check(recipe: str | None, base: str | None, tuned: str | None, reference: str | None,
          deltas: tuple[str, ...]) -> None:
    """Check that the models share one vocabulary and that the tuned model's chat template renders.

    Reads headers only: no weights are loaded.
    """
    base_path, pairs = chosen_models(recipe, base, tuned, reference, deltas)
    infos = {"base": read_vocab(base_path)}
    for i, (t, r, _) in enumerate(pairs, 1):
        tuned_role, reference_role = role_names(i)
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


