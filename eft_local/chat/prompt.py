"""What each model sees: chat-template rendering, raw text, and a plain-text transcript.

Default (the EFT paper): every model gets the same token ids, rendered with the tuned model's
chat template. ``base_prompt="plain"`` (proxy-tuning) gives the pre-trained models a plain
transcript instead; only the generated continuation is shared.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..runtime.backend import Backend
from ..core.errors import EFTError
from .template import ChatTemplate

Message = Mapping[str, str]
ROLES = ("system", "user", "assistant")


def check_messages(messages: Sequence[Message]) -> None:
    """Raise EFTError unless ``messages`` is a non-empty list of {role, content} dicts."""
    if not messages:
        raise EFTError("no messages to respond to")
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise EFTError(f"each message needs a role in {ROLES} and a string content, got {m!r}")


def without_oldest_turn(messages: Sequence[Message]) -> list[Message] | None:
    """``messages`` without their oldest turn (a user message and what follows it up to the next
    one), for a chat that no longer fits; system messages at the start and the last user message
    stay. None when nothing can go."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    after = next((i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"), None)
    return None if after is None else [*messages[:start], *messages[after:]]


def plain_transcript(messages: Sequence[Message]) -> str:
    """A chat as plain text that a pre-trained model can continue as the assistant."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    lines = [f"{names[m['role']]}: {m['content']}" for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:"


def chat_tokens(model: Backend, template: ChatTemplate | None, messages: Sequence[Message]) -> list[int]:
    """Tokens for a chat turn, as llama-cpp-python's create_chat_completion builds them.

    The template writes BOS itself, so none is added; special tokens in it are parsed. A
    model without a template gets the plain transcript.
    """
    text, add_bos = chat_prompt(model, template, messages)
    return raw_tokens(model, text) if add_bos else model.tokenize(text, add_bos=False, special=True)


def chat_prompt(model: Backend, template: ChatTemplate | None, messages: Sequence[Message]) -> tuple[str, bool]:
    """The text a chat turn is tokenized from, and whether BOS is added to it (only to the
    plain transcript of a model without a template: a template writes BOS itself)."""
    if template is None:
        return plain_transcript(messages), True
    return chat_text(model, template, messages), False


def chat_text(model: Backend, template: ChatTemplate, messages: Sequence[Message]) -> str:
    """The text a chat turn renders to with ``template`` and ``model``'s BOS/EOS texts."""
    def text_of(token: int) -> str:
        return model.token_text(token) if token >= 0 else ""

    return template.render(messages, bos=text_of(model.bos_id), eos=text_of(model.eos_id))


def raw_tokens(model: Backend, text: str) -> list[int]:
    """Tokens for raw text, as llama-cpp-python's create_completion builds them (model's BOS rule)."""
    tokens = model.tokenize(text, add_bos=True, special=True)
    if not tokens:
        raise EFTError("the prompt is empty")
    return tokens
