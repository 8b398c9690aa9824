"""OpenAI-shaped results: the dicts llama-cpp-python's ``create_completion`` and
``create_chat_completion`` return, whole or (``stream=True``) as an iterator of chunks.

Log-probabilities come from the combined EFT distribution the tokens are drawn from.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Generator, Iterator

from .results import Chunk, usage

# A token's bytes: the tuned model's piece.
Piece = Callable[[int], bytes]


def completion(chunks: Iterator[Chunk], piece: Piece, *, model: str, stream: bool = False,
               with_logprobs: bool = False, include_usage: bool = False) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """A text completion's stream ``chunks`` as ``create_completion`` returns it."""
    head = _head("cmpl", "text_completion", model)
    events = _closing(_completion_events(piece, chunks, head, with_logprobs, include_usage), chunks)
    return events if stream else _last_whole(events)


def chat_completion(chunks: Iterator[Chunk], piece: Piece, *, model: str, stream: bool = False,
                    with_logprobs: bool = False, include_usage: bool = False) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """The assistant's reply's stream ``chunks`` as ``create_chat_completion`` returns it."""
    head = _head("chatcmpl", "chat.completion", model)
    events = _closing(_chat_events(piece, chunks, head, with_logprobs, include_usage), chunks)
    return events if stream else _last_whole(events)


def _head(prefix: str, kind: str, model: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def _token_text(piece: Piece, token: int) -> tuple[str, list[int]]:
    raw = piece(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _closing(events: Generator[dict[str, Any], None, dict[str, Any]],
             chunks: Iterator[Chunk]) -> Generator[dict[str, Any], None, dict[str, Any]]:
    """``events``, closing the underlying stream when they end or are dropped (a client gone
    mid-stream lets go of the models at once, not when the stream is collected)."""
    try:
        return (yield from events)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _last_whole(events: Generator[dict[str, Any], None, dict[str, Any]]) -> dict[str, Any]:
    """Run the chunk generator to its end and return the whole result it returns."""
    while True:
        try:
            next(events)
        except StopIteration as end:
            return end.value


# Each generator below yields the stream's chunks and returns the whole result.


def _completion_events(piece: Piece, chunks: Iterator[Chunk], head: dict[str, Any], with_logprobs: bool,
                       include_usage: bool) -> Generator[dict[str, Any], None, dict[str, Any]]:
    text: list[str] = []
    lp: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    offset = 0
    stats: dict[str, Any] = {}
    finish = None
    for chunk in chunks:
        piece_lp = None
        if chunk.token is not None and with_logprobs:
            token_text, _ = _token_text(piece, chunk.token)
            piece_lp = {"tokens": [token_text], "text_offset": [offset], "token_logprobs": [chunk.logprob],
                        "top_logprobs": [{_token_text(piece, t)[0]: v for t, v in chunk.top_logprobs or []}]}
            for key in lp:
                lp[key].extend(piece_lp[key])
            offset += len(token_text)
        text.append(chunk.text)
        if chunk.finish_reason is not None:
            finish, stats = chunk.finish_reason, chunk.stats or {}
        if chunk.text or piece_lp or finish:
            yield {**head, "choices": [{"text": chunk.text, "index": 0, "logprobs": piece_lp, "finish_reason": finish}]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(stats)}
    return {**head, "choices": [{"text": "".join(text), "index": 0, "logprobs": lp if with_logprobs else None,
                                "finish_reason": finish}], "usage": usage(stats)}


def _chat_events(piece: Piece, chunks: Iterator[Chunk], head: dict[str, Any], with_logprobs: bool,
                 include_usage: bool) -> Generator[dict[str, Any], None, dict[str, Any]]:
    chunk_head = {**head, "object": "chat.completion.chunk"}
    text: list[str] = []
    content_lp: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    finish = None
    yield {**chunk_head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}]}
    for chunk in chunks:
        piece_lp = None
        if chunk.token is not None and with_logprobs:
            token_text, token_bytes = _token_text(piece, chunk.token)
            alternatives = []
            for t, v in chunk.top_logprobs or []:
                alt_text, alt_bytes = _token_text(piece, t)
                alternatives.append({"token": alt_text, "logprob": v, "bytes": alt_bytes})
            entry = {"token": token_text, "logprob": chunk.logprob, "bytes": token_bytes, "top_logprobs": alternatives}
            content_lp.append(entry)
            piece_lp = {"content": [entry]}
        text.append(chunk.text)
        if chunk.finish_reason is not None:
            finish, stats = chunk.finish_reason, chunk.stats or {}
        if chunk.text or piece_lp:
            yield {**chunk_head, "choices": [{"index": 0, "delta": {"content": chunk.text}, "logprobs": piece_lp,
                                              "finish_reason": None}]}
    yield {**chunk_head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]}
    if include_usage:
        yield {**chunk_head, "choices": [], "usage": usage(stats)}
    message = {"role": "assistant", "content": "".join(text)}
    return {**head, "choices": [{"index": 0, "message": message,
                                "logprobs": {"content": content_lp} if with_logprobs else None,
                                "finish_reason": finish}], "usage": usage(stats)}
