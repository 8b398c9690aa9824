"""The chat-template contract: a model's template renders a chat into the prompt text.

``ChatTemplate`` is compiled once per model set and rendered for every chat, in the sandbox of
``sandbox`` (limits on time, output and values built); a template that fails is one ``EFTError``
line naming the model file.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..core.errors import EFTError
from ..runtime.vocab import VocabInfo
from . import sandbox
from .sandbox import TemplateError

# A short conversation every real template accepts: no system message (some templates refuse
# one) and alternating roles (some insist on them).
SAMPLE_CHAT: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
)


class ChatTemplate:
    """A model's chat template, compiled once and rendered within time, output and size limits.

    A template that does not compile fails at its first render (raw prompts never need it).
    """

    def __init__(self, source: str, path: str):
        self.source = source
        self.path = path
        self._error: str | None = None
        try:
            self._template = sandbox.compile_template(source)
        except TemplateError as e:
            self._error = self._message(e)

    @classmethod
    def from_vocab(cls, info: VocabInfo) -> "ChatTemplate | None":
        """The chat template of a GGUF file's header, or None when it has none."""
        return cls(info.chat_template, info.path) if info.chat_template else None

    def _message(self, reason: object) -> str:
        return f"chat template of {self.path}: {reason}"

    def render(self, messages: Sequence[Mapping[str, str]], *, bos: str, eos: str) -> str:
        """The prompt for ``messages``, ready for the assistant's reply, as create_chat_completion renders it."""
        if self._error is not None:
            raise EFTError(self._error)
        variables = dict(messages=[dict(m) for m in messages], eos_token=eos, bos_token=bos, add_generation_prompt=True,
                         functions=None, function_call=None, tools=None, tool_choice=None)
        try:
            return sandbox.render(self._template, variables)
        except TemplateError as e:
            raise EFTError(self._message(e)) from None


def render_sample(info: VocabInfo) -> str:
    """Render ``SAMPLE_CHAT`` with a model's chat template; EFTError when the template fails."""
    template = ChatTemplate.from_vocab(info)
    if template is None:
        raise EFTError(f"{info.path} has no chat template")

    def text_of(token: int | None) -> str:
        return info.tokens[token] if token is not None and 0 <= token < len(info.tokens) else ""

    return template.render(SAMPLE_CHAT, bos=text_of(info.bos_id), eos=text_of(info.eos_id))
