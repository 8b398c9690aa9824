"""What a generation gives back: stream chunks, the whole completion, per-token log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..core.errors import EFTError
from ..core.textstream import TextStream

if TYPE_CHECKING:
    from ..runtime.backend import Backend
    from ..core.params import SamplingParams


@dataclass
class Chunk:
    """One step of a stream: the text that became safe to show and the token sampled.

    The last chunk has ``token`` None, a ``finish_reason`` ("stop" or "length") and ``stats``.
    """

    text: str
    token: int | None = None
    finish_reason: str | None = None
    stats: dict[str, Any] | None = None
    logprob: float | None = None  # with ``logprobs``: the token's under the combined distribution
    top_logprobs: list[tuple[int, float]] | None = None  # and the most likely (id, logprob) there


@dataclass
class Completion:
    """A finished generation."""

    text: str
    tokens: list[int]
    finish_reason: str
    stats: dict[str, Any] = field(default_factory=dict)
    # With ``logprobs``: per token, its log-probability and the top (id, log-probability) pairs.
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    @property
    def usage(self) -> dict[str, int]:
        """Token counts under the OpenAI API's names."""
        return usage(self.stats, len(self.tokens))

    @classmethod
    def from_chunks(cls, chunks: Iterable[Chunk]) -> "Completion":
        """Collect a stream into one result."""
        text, tokens, logprobs = [], [], []
        try:
            for chunk in chunks:
                text.append(chunk.text)
                if chunk.token is not None:
                    tokens.append(chunk.token)
                    if chunk.logprob is not None:
                        logprobs.append((chunk.logprob, chunk.top_logprobs or []))
                if chunk.finish_reason is not None:
                    return cls("".join(text), tokens, chunk.finish_reason, chunk.stats or {},
                               logprobs if len(logprobs) == len(tokens) and tokens else None)
        finally:
            # Interrupted halfway, the stream lets go of the models now, not when collected.
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        raise EFTError("generation ended without a result")


def usage(stats: dict[str, Any], n_tokens: int = 0) -> dict[str, int]:
    """A reply's stats as OpenAI's usage (``n_tokens`` where the stats lack the completion's)."""
    prompt, completion = stats.get("prompt_tokens", 0), stats.get("completion_tokens", n_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_logprobs(logp: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the ``k`` most likely (id, log-probability) pairs."""
    top: list[tuple[int, float]] = []
    if k:
        ids = np.argpartition(-logp, k - 1)[:k] if k < len(logp) else np.arange(len(logp))
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        top = [(int(i), float(logp[i])) for i in ids]
    return float(logp[token]), top


class Reply:
    """A reply as it is built token by token, the same way by every decoder: the text safe to
    show (whole characters, stop strings held back), the tokens, and why it ended."""

    def __init__(self, tuned: "Backend", params: "SamplingParams", *, dropped_messages: int = 0):
        self.tuned = tuned
        self.params = params
        self.dropped_messages = dropped_messages  # what the context shift left out of the chat
        self.text = TextStream(params.stop)
        self.tokens: list[int] = []
        self.finish: str | None = None  # set when the reply ends ("stop" or "length")

    def take(self, token: int, logp: np.ndarray | None) -> Chunk | None:
        """The chunk to show for ``token`` (None for an end-of-generation token, which ends the
        reply); ``logp`` is the distribution it was drawn from, for ``logprobs``."""
        if self.tuned.is_eog(token):
            self.finish = "stop"
            return None
        self.tokens.append(token)
        chunk = Chunk(self.text.feed(self.tuned.piece(token)), token)
        if self.params.logprobs is not None:
            chunk.logprob, chunk.top_logprobs = token_logprobs(logp, token, self.params.logprobs)
        if self.text.stopped:
            self.finish = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish = "length"
        return chunk

    def end(self, *, prompt_tokens: int, prompt_eval_tokens: int, prompt_seconds: float, generate_seconds: float,
            **extra: Any) -> Chunk:
        """The last chunk: what text was held back, why the reply ended and the stats. A reply
        that has not ended by itself filled the context (finish_reason "length", stats
        ``context_full``)."""
        n = len(self.tokens)
        if self.params.context_shift:
            extra["dropped_messages"] = self.dropped_messages
        finish = self.finish
        if finish is None:
            finish, extra["context_full"] = "length", True
        stats = {
            "prompt_tokens": prompt_tokens,
            # Fewer than prompt_tokens when the models' caches already held the start.
            "prompt_eval_tokens": prompt_eval_tokens,
            "completion_tokens": n,
            "prompt_seconds": round(prompt_seconds, 4),
            "generate_seconds": round(generate_seconds, 4),
            "tokens_per_second": round(n / generate_seconds, 2) if n and generate_seconds > 0 else 0.0,
            **extra,
        }
        return Chunk(self.text.flush(), None, finish, stats)
