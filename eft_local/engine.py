"""The EFT step loop over three llama.cpp models: prefill, combine, sample, append, stop."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .backend import Backend
from .combine import eft_logprobs, log_softmax, plausible
from .errors import EFTError
from .guard import Guard, holding
from .interrupts import sigint_deferred
from .explain import TokenExplanation, explain_tokens
from .prompt import Message, chat_text, chat_tokens, check_messages, plain_transcript, raw_tokens
from .template import ChatTemplate
from . import openai_format
from .params import Plausibility, SamplingParams, check_weight
from .sampling import Sampler
from .speculative import SpecStats, speculative_tokens
from .text import check_text
from .textstream import TextStream
from .vocab import VocabReport, check_vocabularies, read_vocab

BASE_PROMPTS = ("same", "plain")
DEFAULT_CTX = 4096
# Measured on 2 cores (see README): three small models decode faster one after another,
# each with every core, than side by side in threads.
DEFAULT_CONCURRENT = False


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


@dataclass(frozen=True)
class Mix:
    """How one call combines the models: the deltas' weights and the plausibility filter."""

    weights: tuple[float, ...]
    plausibility: Plausibility = Plausibility()


@dataclass
class StepTiming:
    """Where the time of non-speculative steps went."""

    forward_seconds: float = 0.0
    combine_seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        return {"forward_seconds": round(self.forward_seconds, 4), "combine_sample_seconds": round(self.combine_seconds, 4)}


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


class EFT:
    """GGUF models sampled as one: ``base + sum_i weight_i * (tuned_i - reference_i)``, per token.

    ``tuned``, ``reference`` and ``weight`` give one delta; ``deltas`` gives any number as
    ``(tuned, reference)`` or ``(tuned, reference, weight)`` (the first is the one-delta form's,
    when both are given). The first tuned model renders chats, decides where a reply ends and
    drafts speculative tokens. Roles are named ``base``, ``tuned``, ``reference`` for the first
    delta and ``tuned2``, ``reference2``, ... for the next.

    Use as a context manager (or call ``close``) so the llama.cpp contexts are freed. One
    instance serves one generation at a time: calls from other threads wait for the running one,
    and a call made while this thread's own stream is unfinished raises ``EFTError``. Each model
    keeps its KV cache between calls,
    so a new request only evaluates the tokens after the longest common prefix. A file given in
    several roles that sees the same prompt is loaded and evaluated once. ``n_threads`` and
    ``n_gpu_layers`` take one value for all models or a mapping by role (``{"base": -1}``
    offloads only the large model).
    """

    def __init__(
        self,
        base: str | os.PathLike,
        tuned: str | os.PathLike | None = None,
        reference: str | os.PathLike | None = None,
        *,
        weight: float = 1.0,
        deltas: Sequence[Sequence[Any]] = (),
        n_ctx: int = DEFAULT_CTX,
        n_threads: int | Mapping[str, int] | None = None,
        n_gpu_layers: int | Mapping[str, int] = 0,
        concurrent: bool | None = None,
        base_prompt: str = "same",
        name: str | None = None,
    ):
        if base_prompt not in BASE_PROMPTS:
            raise EFTError(f"base_prompt must be one of {BASE_PROMPTS}, got {base_prompt!r}")
        if n_ctx < 8:
            raise EFTError(f"context size must be at least 8 tokens, got {n_ctx}")
        self.base_prompt = base_prompt
        # What results call the model: the base file's name, unless given.
        self.name = name or os.path.splitext(os.path.basename(os.fspath(base)))[0]
        self._end_tokens: tuple[int, ...] | None = None
        pairs = ([(tuned, reference, weight)] if tuned is not None or reference is not None else []) + list(deltas)
        if not pairs:
            raise EFTError("give a tuned and a reference model (or deltas)")
        paths = {"base": os.fspath(base)}
        self.deltas: list[tuple[str, str]] = []
        self.weights: list[float] = []
        for i, pair in enumerate(pairs, 1):
            if len(pair) not in (2, 3) or pair[0] is None or pair[1] is None:
                raise EFTError(f"delta {i} needs a tuned and a reference model, got {pair!r}")
            t, r = delta_roles(i)
            paths[t], paths[r] = os.fspath(pair[0]), os.fspath(pair[1])
            self.deltas.append((t, r))
            self.weights.append(check_weight(pair[2] if len(pair) == 3 else 1.0))
        self.roles = list(paths)
        # The check reads only GGUF headers, so a bad set fails before any weights load.
        self.vocabs = {role: read_vocab(p) for role, p in paths.items()}
        self.report: VocabReport = check_vocabularies(self.vocabs)
        self.n_shared = self.report.n_shared
        # Compiled once here: compiling it again for every request would cost more than rendering.
        self.chat_template = ChatTemplate.from_vocab(self.vocabs["tuned"])

        keys = {role: (os.path.realpath(paths[role]), self._view(role)) for role in self.roles}
        unique = list(dict.fromkeys(keys.values()))
        self.concurrent = DEFAULT_CONCURRENT if concurrent is None else bool(concurrent)
        cores = int(os.environ.get("EFT_LOCAL_THREADS") or os.cpu_count() or 1)
        default_threads = max(1, cores // len(unique)) if self.concurrent else cores
        threads = per_role(n_threads, "n_threads", default_threads, self.roles)
        gpu_layers = per_role(n_gpu_layers, "n_gpu_layers", 0, self.roles)
        check_threads(threads)
        for role, n in gpu_layers.items():
            if n < -1:
                raise EFTError(f"n_gpu_layers must be -1 (all) or more, got {n} for {role}")
        # Set before loading: close() after a failed load goes through the guard.
        self._guard = Guard(self._free)
        self._pool = None
        self._backends: dict[tuple[str, str], Backend] = {}
        self.models: dict[str, Backend] = {}
        # The context is capped at each model's trained length; errors say so when it was.
        self.requested_ctx = n_ctx
        try:
            for role in self.roles:
                if keys[role] not in self._backends:
                    ctx = min(n_ctx, self.vocabs[role].context_length or n_ctx)
                    self._backends[keys[role]] = Backend(
                        paths[role], n_ctx=ctx, n_threads=threads[role], n_gpu_layers=gpu_layers[role]
                    )
                self.models[role] = self._backends[keys[role]]
                if self.models[role].n_vocab != self.vocabs[role].n_vocab:
                    raise EFTError(
                        f"{paths[role]}: llama.cpp reports {self.models[role].n_vocab} tokens, "
                        f"the GGUF lists {self.vocabs[role].n_vocab}"
                    )
        except BaseException:
            self.close()
            raise
        self._pool = (
            ThreadPoolExecutor(max_workers=len(unique), thread_name_prefix="eft")
            if self.concurrent and len(unique) > 1
            else None
        )

    def _view(self, role: str) -> str:
        return "plain" if self.base_prompt == "plain" and not role.startswith("tuned") else "chat"

    @property
    def weight(self) -> float:
        """The first delta's weight."""
        return self.weights[0]

    @weight.setter
    def weight(self, value: float) -> None:
        self.weights[0] = check_weight(value)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Change every delta's weight; no model is reloaded and no cache is lost."""
        self.weights = self._checked_weights(weights)

    def _mix(self, weights: Sequence[float] | None, plausibility: Plausibility = Plausibility()) -> Mix:
        return Mix(tuple(self._checked_weights(weights)), plausibility)

    def _checked_weights(self, weights: Sequence[float] | None) -> list[float]:
        if weights is None:
            return list(self.weights)
        if len(weights) != len(self.deltas):
            raise EFTError(f"{len(weights)} weights given for {len(self.deltas)} deltas")
        return [check_weight(w) for w in weights]

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Free every llama.cpp context and model; later calls raise ``EFTError``.

        Waits for a generation running in another thread; when this thread's own stream is
        unfinished, the models are freed as that stream ends.
        """
        guard = getattr(self, "_guard", None)
        if guard is None:
            self._free()
        else:
            guard.close()

    @property
    def closed(self) -> bool:
        return self._guard.closed

    def _free(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._pool = None
        for model in self._backends.values():
            model.close()
        self._backends.clear()

    def __enter__(self) -> "EFT":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def backends(self) -> list[Backend]:
        """The distinct loaded models (a file in two roles with one view counts once)."""
        return list(self._backends.values())

    @property
    def n_ctx(self) -> int:
        return min(b.n_ctx for b in self.backends)

    # --- the step --------------------------------------------------------------------------

    def _run(self, work: Callable[[Backend], object]) -> None:
        """Run ``work`` on every distinct model, in threads when concurrent."""
        self._run_on(self.backends, work)

    def _run_on(self, backends: Sequence[Backend], work: Callable[[Backend], object]) -> None:
        """Run ``work`` on ``backends``, in threads when concurrent."""
        if self._pool is None or len(backends) < 2:
            for b in backends:
                work(b)
            return
        # Ctrl-C waits for the in-flight decodes, so each cache still matches its token list
        # (and a wait interrupted halfway can break the executor's own locks).
        with sigint_deferred():
            futures = [self._pool.submit(work, b) for b in backends]
            wait(futures)
        for f in futures:
            f.result()

    def _combined(self, mix: Mix) -> np.ndarray:
        """Combined log-probabilities at every model's last evaluated position."""
        return self.combine_rows({b: log_softmax(b.logits()) for b in self.backends}, mix)

    def combine_rows(self, logp: Mapping[Backend, np.ndarray], mix: Mix) -> np.ndarray:
        """The distribution tokens are sampled from at one position (before the sampler's own
        filters), from each distinct model's log-probabilities there: the EFT combination, then
        the plausibility filter. Generation, speculative verification and ``explain`` all use it.
        """
        m = self.models
        combined = eft_logprobs(
            logp[m["base"]],
            [(logp[m[t]], logp[m[r]], w) for (t, r), w in zip(self.deltas, mix.weights)],
            self.n_shared,
        )
        f = mix.plausibility
        if f.active:
            combined = plausible(combined, logp[m[f.model]], f.top_p, f.min_p)
        return combined

    def end_tokens(self) -> tuple[int, ...]:
        """The tuned model's end-of-generation ids within the shared vocabulary."""
        if self._end_tokens is None:
            tuned = self.models["tuned"]
            self._end_tokens = tuple(t for t in range(self.n_shared) if tuned.is_eog(t))
        return self._end_tokens

    @holding
    def next_logprobs(self, tokens: Sequence[int], *, weights: Sequence[float] | None = None) -> np.ndarray:
        """Combined next-token log-probabilities after ``tokens`` (all models see the same ids).

        Returns an array over the shared vocabulary ``[0, n_shared)``.
        """
        tokens = [int(t) for t in tokens]
        mix = self._mix(weights)
        self._check_tokens(tokens)
        self._run(lambda b: b.sync(tokens))
        return self._combined(mix)

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        if not tokens:
            raise EFTError("no tokens to evaluate")
        bad = [t for t in tokens if not 0 <= t < self.n_shared]
        if bad:
            raise EFTError(f"token id {bad[0]} is outside the shared vocabulary [0, {self.n_shared})")
        if len(tokens) >= self.n_ctx:
            raise EFTError(f"prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; {self._ctx_hint()}")

    def _ctx_hint(self) -> str:
        """What would make room: a larger --ctx-size, unless a model's trained length is the cap."""
        if self.n_ctx < self.requested_ctx:
            capped = min(self.backends, key=lambda b: b.n_ctx)
            return f"that is the trained length of {os.path.basename(capped.path)}, which no option raises"
        return "raise --ctx-size (n_ctx)"

    # --- prompts ---------------------------------------------------------------------------

    @holding
    def prompt_tokens(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None, raw: bool = False) -> dict[str, list[int]]:
        """The token ids each role sees for a prompt (raw text) or a chat (messages)."""
        return self._prompt_tokens(prompt, messages=messages, raw=raw)

    def _prompt_tokens(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None, raw: bool = False) -> dict[str, list[int]]:
        if (prompt is None) == (messages is None):
            raise EFTError("give either a prompt or messages")
        if raw and prompt is None:
            raise EFTError("raw mode takes a prompt string, not messages")
        if messages is None:
            messages = [{"role": "user", "content": prompt}]
        check_messages(messages)
        for i, m in enumerate(messages, 1):
            check_text(m["content"], "the prompt" if prompt is not None else f"message {i}")
        tuned = self.models["tuned"]
        if raw:
            shared = raw_tokens(tuned, prompt)
        else:
            shared = chat_tokens(tuned, self.chat_template, messages)
        out = {}
        for role in self.roles:
            if self._view(role) == "plain" and not raw:
                out[role] = raw_tokens(self.models[role], plain_transcript(messages))
            else:
                out[role] = shared
        return out

    # --- generation ------------------------------------------------------------------------

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        raw: bool = False,
        params: SamplingParams | None = None,
        **options: Any,
    ) -> Iterator[Chunk]:
        """Generate a reply piece by piece.

        ``prompt`` is rendered as one user message with the tuned model's chat template,
        unless ``raw``; ``messages`` is a whole chat. ``params`` and ``options`` (any field of
        ``SamplingParams``, overriding ``params``: ``max_tokens``, ``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``seed``, ``stop``, ``speculative``, ``ignore_eos``, ``weights``,
        ``plausible_top_p``, ``plausible_min_p``, ``plausible_model``, ``logprobs``) say how.
        Stops at the tuned model's end-of-generation tokens, at a ``stop`` string (never
        included in the text), or after ``max_tokens``. ``speculative`` = k drafts k tokens with
        the tuned model per verification ("auto" adapts k); the output distribution is the
        same. ``ignore_eos`` never samples the end tokens (for benchmarks). ``weights``
        overrides the deltas' weights for this call only. The plausibility options restrict
        sampling to tokens ``plausible_model`` finds plausible (conservative decoding).
        """
        p = SamplingParams.create(params, **options)
        mix = self._mix(p.weights, p.plausibility)
        # Prompts are rendered and checked now, so a bad request fails at the call.
        by_role, banned = self._checked_prompts(prompt, messages, raw, p.ignore_eos)
        return self._loop(by_role, p.sampler(banned), np.random.default_rng(p.seed), p, mix)

    @holding
    def _checked_prompts(self, prompt: str | None, messages: Sequence[Message] | None, raw: bool,
                         ignore_eos: bool) -> tuple[dict[str, list[int]], tuple[int, ...]]:
        """Each role's prompt tokens, checked against the context, and the ids to ban."""
        by_role = self._prompt_tokens(prompt, messages=messages, raw=raw)
        for toks in by_role.values():
            self._check_tokens(toks)
        return by_role, self.end_tokens() if ignore_eos else ()

    def _loop(
        self,
        by_role: dict[str, list[int]],
        sampler: Sampler,
        rng: np.random.Generator,
        params: SamplingParams,
        mix: Mix,
    ) -> Iterator[Chunk]:
        """The EFT loop: prefill every model, then take tokens until a stop.

        The models are held for the whole generation (another thread's call waits) and let go
        before the last chunk, so a caller that stops reading there keeps nothing locked.
        """
        tuned = self.models["tuned"]
        text = TextStream(params.stop)
        tokens: list[int] = []
        speculative = params.speculative
        guard = self._guard
        with guard.take():
            guard.enter()
            source = None
            try:
                prompts = {self.models[role]: toks for role, toks in by_role.items()}
                t0 = time.perf_counter()
                evaluated = tuned.n_evaluated
                self._run(lambda b: b.sync(prompts[b]))
                prompt_eval = tuned.n_evaluated - evaluated
                t1 = time.perf_counter()
                if speculative:
                    timing = SpecStats()
                    k = None if speculative == "auto" else int(speculative)
                    source = ((t, None) for t in speculative_tokens(self, sampler, rng, k, mix, timing))
                else:
                    timing = StepTiming()
                    source = self._plain_tokens(sampler, rng, mix, timing)
                finish = "length"
                for token, logp in source:
                    if guard.closed:
                        raise EFTError("this EFT is closed")
                    if tuned.is_eog(token):
                        finish = "stop"
                        break
                    tokens.append(token)
                    piece = text.feed(tuned.piece(token))
                    chunk = Chunk(piece, token)
                    if params.logprobs is not None:
                        chunk.logprob, chunk.top_logprobs = token_logprobs(logp, token, params.logprobs)
                    yield chunk
                    if text.stopped:
                        finish = "stop"
                        break
                    if len(tokens) >= params.max_tokens:
                        break
            finally:
                if source is not None:
                    source.close()
                guard.leave()
        tail = text.flush()
        t2 = time.perf_counter()
        stats = {
            "prompt_tokens": len(prompts[tuned]),
            # Fewer than prompt_tokens when the models' caches already held the start.
            "prompt_eval_tokens": prompt_eval,
            "completion_tokens": len(tokens),
            "prompt_seconds": round(t1 - t0, 4),
            "generate_seconds": round(t2 - t1, 4),
            "tokens_per_second": round(len(tokens) / (t2 - t1), 2) if tokens and t2 > t1 else 0.0,
            **timing.summary(),
        }
        yield Chunk(tail, None, finish, stats)

    def _plain_tokens(self, sampler: Sampler, rng: np.random.Generator, mix: Mix,
                      timing: "StepTiming") -> Iterator[tuple[int, np.ndarray]]:
        """One token per step: combine, sample, then append it to every model.

        Yields each token with the combined distribution it was drawn from.
        """
        while True:
            t0 = time.perf_counter()
            logp = self._combined(mix)
            token = sampler.sample(logp, rng)
            t1 = time.perf_counter()
            timing.combine_seconds += t1 - t0
            yield token, logp
            if any(len(b.tokens) >= b.n_ctx for b in self.backends):
                return
            t2 = time.perf_counter()
            # One deferral for all models' one-token decodes (each would otherwise swap handlers).
            with sigint_deferred():
                self._run(lambda b: b.eval([token]))
            timing.forward_seconds += time.perf_counter() - t2

    def explain(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        raw: bool = False,
        reply: str | None = None,
        weights: Sequence[float] | None = None,
        plausible_top_p: float = 1.0,
        plausible_min_p: float = 0.0,
        plausible_model: str = "tuned",
        **options: Any,
    ) -> list[TokenExplanation]:
        """Every token of a reply with each model's log-probability and each delta's term.

        Scores ``reply`` when given (tokenized as the continuation of the rendered prompt, as
        a generated reply would be); otherwise generates one (``options`` as for ``stream``).
        The combined column is the distribution generation samples from, plausibility filter
        included.
        """
        mix = self._mix(weights, Plausibility(plausible_top_p, plausible_min_p, plausible_model))
        if reply is None:
            plausibility = dict(plausible_top_p=plausible_top_p, plausible_min_p=plausible_min_p,
                                plausible_model=plausible_model)
            tokens = self.generate(prompt, messages=messages, raw=raw, weights=mix.weights, **plausibility,
                                   **options).tokens
        else:
            check_text(reply, "the reply")
        return self._explain(prompt, messages, raw, reply, tokens if reply is None else None, mix)

    @holding
    def _explain(self, prompt: str | None, messages: Sequence[Message] | None, raw: bool, reply: str | None,
                 tokens: list[int] | None, mix: Mix) -> list[TokenExplanation]:
        prompts = self._prompt_tokens(prompt, messages=messages, raw=raw)
        if tokens is None:
            tokens = self._reply_tokens(prompts["tuned"], prompt, messages, raw, reply)
        return explain_tokens(self, prompts, tokens, mix)

    def _reply_tokens(self, prompt_tokens: list[int], prompt: str | None, messages: Sequence[Message] | None,
                      raw: bool, reply: str) -> list[int]:
        """``reply`` tokenized as the continuation of the tuned model's prompt text.

        Tokenized alone, a SentencePiece tokenizer would give it a leading space (" Their"),
        which is not the token a model generating the reply produces ("Their").
        """
        tuned = self.models["tuned"]
        text, add_bos = self._prompt_text(prompt, messages, raw)
        full = tuned.tokenize(text + reply, add_bos=add_bos, special=True)
        n = len(prompt_tokens)
        if full[:n] == prompt_tokens and len(full) > n:
            return full[n:]
        # The reply's first characters merged with the prompt's last token: score it alone.
        return tuned.tokenize(reply, add_bos=False, special=False)

    def _prompt_text(self, prompt: str | None, messages: Sequence[Message] | None, raw: bool) -> tuple[str, bool]:
        """The tuned model's prompt as text, and whether its tokenization adds BOS."""
        if raw:
            return prompt, True
        if messages is None:
            messages = [{"role": "user", "content": prompt}]
        if self.chat_template is None:
            return plain_transcript(messages), True
        tuned = self.models["tuned"]
        return chat_text(tuned, self.chat_template, messages), False

    def generate(self, prompt: str | None = None, **options: Any) -> Completion:
        """Generate a whole reply; takes the same arguments as ``stream``."""
        return Completion.from_chunks(self.stream(prompt, **options))

    def create_completion(self, prompt: str, *, stream: bool = False, model: str | None = None,
                          **options: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """A raw-text completion as the dict llama-cpp-python's ``create_completion`` returns
        (``stream=True``: an iterator of chunk dicts). ``logprobs=k`` adds the combined
        distribution's log-probabilities with k alternatives; other options as for ``stream``.
        """
        return openai_format.completion(self, prompt, model=model or self.name, stream=stream, **options)

    def create_chat_completion(self, messages: Sequence[Message], *, stream: bool = False, model: str | None = None,
                               **options: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """The reply to a chat as the dict llama-cpp-python's ``create_chat_completion`` returns
        (``stream=True``: chunk dicts). ``logprobs=True`` and ``top_logprobs=k`` report the
        combined distribution; other options as for ``stream``.
        """
        return openai_format.chat_completion(self, messages, model=model or self.name, stream=stream, **options)

    def chat(self, messages: Sequence[Message], **options: Any) -> Completion:
        """Reply to a chat (a list of {"role", "content"} messages)."""
        return self.generate(messages=messages, **options)

    def stream_chat(self, messages: Sequence[Message], **options: Any) -> Iterator[Chunk]:
        """Stream a reply to a chat."""
        return self.stream(messages=messages, **options)


def token_logprobs(logp: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the ``k`` most likely (id, log-probability) pairs."""
    top: list[tuple[int, float]] = []
    if k:
        ids = np.argpartition(-logp, k - 1)[:k] if k < len(logp) else np.arange(len(logp))
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        top = [(int(i), float(logp[i])) for i in ids]
    return float(logp[token]), top


def delta_roles(i: int) -> tuple[str, str]:
    """Role names of the i-th delta (from 1): tuned/reference, then tuned2/reference2, ..."""
    return ("tuned", "reference") if i == 1 else (f"tuned{i}", f"reference{i}")


def per_role(value: int | Mapping[str, int] | None, name: str, default: int, roles: Sequence[str]) -> dict[str, int]:
    """One setting for every role, or a mapping of role to setting (missing roles get the default)."""
    if value is None or isinstance(value, int):
        return {role: default if value is None else value for role in roles}
    unknown = set(value) - set(roles)
    if unknown:
        raise EFTError(f"{name}: unknown role {sorted(unknown)[0]!r}; roles are {', '.join(roles)}")
    return {role: int(value.get(role, default)) for role in roles}


def max_threads() -> int:
    """The most threads a model may use: 4 per core (more only adds contention), at most llama.cpp's 512."""
    return min(512, 4 * (os.cpu_count() or 1))


def check_threads(threads: Mapping[str, int]) -> None:
    """Threads per role must be from 1 to ``max_threads()`` (llama.cpp crashes far beyond)."""
    top = max_threads()
    for role, n in threads.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top:
            raise EFTError(f"threads must be from 1 to {top} on this machine, got {n!r} for {role}")


