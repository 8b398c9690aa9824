"""What a generation gives back: stream chunks, the whole completion, per-token log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .errors import EFTError


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
        prompt, completion = self.stats.get("prompt_tokens", 0), self.stats.get("completion_tokens", len(self.tokens))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

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


def token_logprobs(logp: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the ``k`` most likely (id, log-probability) pairs."""
    top: list[tuple[int, float]] = []
    if k:
        ids = np.argpartition(-logp, k - 1)[:k] if k < len(logp) else np.arange(len(logp))
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        top = [(int(i), float(logp[i])) for i in ids]
    return float(logp[token]), top
