"""``EFT``: the facade over a model set, its decoding strategies and their results."""

from __future__ import annotations

import os
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..chat.prompt import (Message, chat_prompt, chat_tokens, check_messages, plain_transcript, raw_tokens,
                           without_oldest_turn)
from ..core.deltas import as_delta, check_weight
from ..core.errors import EFTError
from ..core.params import SamplingParams, check_int
from ..core.sampling import Sampler
from ..core.text import check_text
from ..hub.recipes import default_recipe, recipe_models
from . import openai_format
from .batched import Batcher
from .explain import TokenExplanation, explain_tokens
from .guard import Guard, holding
from .model_set import Mix, ModelSet
from .plain import StepTiming, plain_tokens
from .results import Chunk, Completion, Reply
from .speculative import SpecStats, speculative_tokens

DEFAULT_CTX = 4096


class EFT:
    """GGUF models sampled as one: ``base + sum_i weight_i * (tuned_i - reference_i)``, per token.

    ``tuned``, ``reference`` and ``weight`` give one delta; ``deltas`` gives any number as
    ``(tuned, reference)`` or ``(tuned, reference, weight)`` (the first is the one-delta form's,
    when both are given). The first tuned model renders chats, decides where a reply ends and
    drafts speculative tokens. Roles are named ``base``, ``tuned``, ``reference`` for the first
    delta and ``tuned2``, ``reference2``, ... for the next.

    Use as a context manager (or call ``close``) so the llama.cpp contexts are freed. With
    ``parallel`` 1 an instance serves one generation at a time: calls from other threads wait
    for the running one, and a call made while this thread's own stream is unfinished raises
    ``EFTError``. With ``parallel`` N > 1 up to N generations (from any threads) are decoded
    together in batches, each with its own options; speculative ones still run one at a time.
    Each model keeps its KV cache between calls, so a new request only evaluates the tokens
    after the longest common prefix. A file given in several roles that sees the same prompt is
    loaded and evaluated once. ``n_threads`` and
    ``n_gpu_layers`` take one value for all models or a mapping by role (``{"base": -1}``
    offloads only the large model). ``rpc`` (``"host:port,host:port"`` or a list) puts the base
    model's layers on llama.cpp RPC servers (all of them unless ``n_gpu_layers`` gives the base a
    number); the other models stay in this process. ``model_set`` holds the loaded models
    (``by_role``, the distinct ``backends``, ``n_shared``, ``n_ctx``, the vocabularies).
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
        parallel: int = 1,
        rpc: str | Sequence[str] | None = None,
    ):
        # What results call the model: the base file's name, unless given.
        self.name = name or os.path.splitext(os.path.basename(os.fspath(base)))[0]
        parallel = check_int(parallel, "parallel", 1, 256)
        if rpc is not None and parallel > 1:
            # The slots share contexts made in this process, and an RPC base lives in another.
            raise EFTError("parallel slots need the base model in this process; they do not work with rpc yet")
        pairs = ([(tuned, reference, weight)] if tuned is not None or reference is not None else []) + list(deltas)
        self._guard = Guard(self._free)
        self._batcher: Batcher | None = None
        self.model_set = ModelSet(base, [as_delta(p, f"delta {i}") for i, p in enumerate(pairs, 1)], n_ctx=n_ctx,
                                  n_threads=n_threads, n_gpu_layers=n_gpu_layers, concurrent=concurrent,
                                  base_prompt=base_prompt, rpc=rpc)
        if parallel > 1:
            try:
                # The slots share one more context per model, of n_ctx split over them.
                self._batcher = Batcher(self.model_set, parallel, n_ctx)
            except BaseException:
                self.model_set.close()
                raise

    @classmethod
    def from_recipe(cls, recipe: str | None = None, **options: Any) -> "EFT":
        """The models of a recipe (bundled, in your recipes file, or pulled with ``eft-local pull``;
        None: the default one, the bundled demo), found without network access; ``options`` are
        the constructor's."""
        base, deltas = recipe_models(recipe)
        return cls(base, deltas=deltas, **{"name": recipe or default_recipe(), **options})

    @property
    def weights(self) -> list[float]:
        """Every delta's weight."""
        return self.model_set.weights

    @weights.setter
    def weights(self, value: Sequence[float]) -> None:
        self.set_weights(value)

    @property
    def weight(self) -> float:
        """The first delta's weight."""
        return self.model_set.weights[0]

    @weight.setter
    def weight(self, value: float) -> None:
        self.model_set.weights[0] = check_weight(value)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Change every delta's weight; no model is reloaded and no cache is lost."""
        self.model_set.weights = self.model_set.checked_weights(weights)

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

    @property
    def parallel(self) -> int:
        """How many generations run at once (1: one at a time)."""
        return self._batcher.n_slots if self._batcher else 1

    def _free(self) -> None:
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.close()
        model_set = getattr(self, "model_set", None)
        if model_set is not None:
            model_set.close()

    def __enter__(self) -> "EFT":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @holding
    def next_logprobs(self, tokens: Sequence[int], *, weights: Sequence[float] | None = None) -> np.ndarray:
        """Combined next-token log-probabilities after ``tokens`` (all models see the same ids).

        Returns an array over the shared vocabulary ``[0, n_shared)``.
        """
        tokens = [int(t) for t in tokens]
        mix = self.model_set.mix(weights)
        self.model_set.check_tokens(tokens)
        self.model_set.run(lambda b: b.sync(tokens))
        return self.model_set.combined(mix)

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
        tuned = self.model_set.by_role["tuned"]
        if raw:
            shared = raw_tokens(tuned, prompt)
        else:
            shared = chat_tokens(tuned, self.model_set.chat_template, messages)
        out = {}
        for role in self.model_set.roles:
            if self.model_set.view(role) == "plain" and not raw:
                out[role] = raw_tokens(self.model_set.by_role[role], plain_transcript(messages))
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
        ``SamplingParams``, overriding ``params``; each field's help says what it does) say how.
        Stops at the tuned model's end-of-generation tokens, at a stop string (never included in
        the text), or after the most tokens asked for.
        """
        p = SamplingParams.create(params, **options)
        mix = self.model_set.mix(p.weights, p.plausibility)
        batched = self._batcher is not None and not p.speculative
        # Prompts are rendered and checked now, so a bad request fails at the call.
        by_role, dropped = self._checked_prompts(prompt, messages, raw, p, batched)
        sampler = p.sampler(self.model_set.end_tokens() if p.ignore_eos else ())
        reply = Reply(self.model_set.by_role["tuned"], p, dropped_messages=dropped)
        rng = np.random.default_rng(p.seed)
        if batched:
            return self._batcher.submit(by_role, reply, sampler, rng, mix)
        return self._loop(by_role, reply, sampler, rng, mix)

    @holding
    def _checked_prompts(self, prompt: str | None, messages: Sequence[Message] | None, raw: bool,
                         params: SamplingParams, batched: bool) -> tuple[dict[str, list[int]], int]:
        """Each role's prompt tokens, checked against the context, and how many messages the
        context shift left out (the oldest turns, until the prompt leaves room for a reply:
        ``max_tokens``, but at most half of what a sequence holds)."""
        capacity = self._batcher.slot_ctx if batched else self.model_set.n_ctx
        by_role = self._prompt_tokens(prompt, messages=messages, raw=raw)
        dropped = 0
        room = min(params.max_tokens, capacity // 2)
        while params.context_shift and messages and max(map(len, by_role.values())) + room > capacity:
            shorter = without_oldest_turn(messages)
            if shorter is None:
                break
            dropped, messages = dropped + len(messages) - len(shorter), shorter
            by_role = self._prompt_tokens(messages=messages)
        for toks in by_role.values():
            self.model_set.check_tokens(toks)
        return by_role, dropped

    def _loop(self, by_role: dict[str, list[int]], reply: Reply, sampler: Sampler, rng: np.random.Generator,
              mix: Mix) -> Iterator[Chunk]:
        """The EFT loop: prefill every model, then take tokens until a stop.

        The models are held for the whole generation (another thread's call waits) and let go
        before the last chunk, so a caller that stops reading there keeps nothing locked.
        """
        tuned = self.model_set.by_role["tuned"]
        speculative = reply.params.speculative
        guard = self._guard
        with guard.take():
            guard.enter()
            source = None
            try:
                prompts = {self.model_set.by_role[role]: toks for role, toks in by_role.items()}
                # Speculation drafts with the tuned model, so it runs every model.
                running = self.model_set.backends if speculative else self.model_set.needed(mix)
                counted = tuned if tuned in running else self.model_set.by_role["base"]
                self.model_set.adjust_threads(now=True)
                t0 = time.perf_counter()
                evaluated = counted.n_evaluated
                self.model_set.run_on(running, lambda b: b.sync(prompts[b]))
                prompt_eval = counted.n_evaluated - evaluated
                t1 = time.perf_counter()
                if speculative:
                    timing = SpecStats()
                    k = None if speculative == "auto" else int(speculative)
                    source = ((t, None) for t in speculative_tokens(self.model_set, sampler, rng, k, mix, timing))
                else:
                    timing = StepTiming()
                    source = plain_tokens(self.model_set, sampler, rng, mix, timing)
                for token, logp in source:
                    if guard.closed:
                        raise EFTError("this EFT is closed")
                    chunk = reply.take(token, logp)
                    if chunk is not None:
                        yield chunk
                    if reply.finish:
                        break
            finally:
                if source is not None:
                    source.close()
                guard.leave()
        # A token source that runs out has filled the context.
        yield reply.end(prompt_tokens=len(prompts[tuned]), prompt_eval_tokens=prompt_eval,
                        prompt_seconds=t1 - t0, generate_seconds=time.perf_counter() - t1, **timing.summary())

    def explain(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None, raw: bool = False,
                reply: str | None = None, **options: Any) -> list[TokenExplanation]:
        """Every token of a reply with each model's log-probability and each delta's term.

        Scores ``reply`` when given (tokenized as the continuation of the rendered prompt, as
        a generated reply would be); otherwise generates one. ``options`` are those of
        ``stream``; scoring a given reply reads only the weights and the plausibility filter.
        The combined column is the distribution generation samples from, plausibility filter
        included.
        """
        p = SamplingParams.create(None, **options)
        mix = self.model_set.mix(p.weights, p.plausibility)
        if reply is None:
            tokens = self.generate(prompt, messages=messages, raw=raw, params=p).tokens
        else:
            check_text(reply, "the reply")
        return self._explain(prompt, messages, raw, reply, tokens if reply is None else None, mix)

    @holding
    def _explain(self, prompt: str | None, messages: Sequence[Message] | None, raw: bool, reply: str | None,
                 tokens: list[int] | None, mix: Mix) -> list[TokenExplanation]:
        prompts = self._prompt_tokens(prompt, messages=messages, raw=raw)
        if tokens is None:
            tokens = self._reply_tokens(prompts["tuned"], prompt, messages, raw, reply)
        return explain_tokens(self.model_set, prompts, tokens, mix)

    def _reply_tokens(self, prompt_tokens: list[int], prompt: str | None, messages: Sequence[Message] | None,
                      raw: bool, reply: str) -> list[int]:
        """``reply`` tokenized as the continuation of the tuned model's prompt text.

        Tokenized alone, a SentencePiece tokenizer would give it a leading space (" Their"),
        which is not the token a model generating the reply produces ("Their").
        """
        tuned = self.model_set.by_role["tuned"]
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
        return chat_prompt(self.model_set.by_role["tuned"], self.model_set.chat_template, messages)

    def generate(self, prompt: str | None = None, **options: Any) -> Completion:
        """Generate a whole reply; takes the same arguments as ``stream``."""
        return Completion.from_chunks(self.stream(prompt, **options))

    def create_completion(self, prompt: str, *, stream: bool = False, model: str | None = None,
                          logprobs: int | None = None, include_usage: bool = False, **options: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """A raw-text completion as the dict llama-cpp-python's ``create_completion`` returns
        (``stream=True``: an iterator of chunk dicts). ``logprobs=k`` adds the combined
        distribution's log-probabilities with k alternatives; other options as for ``stream``.
        """
        if not isinstance(prompt, str):
            raise EFTError(f"prompt must be a string, got {type(prompt).__name__}")
        chunks = self.stream(prompt, raw=True, logprobs=logprobs, **options)
        return openai_format.completion(chunks, self.model_set.by_role["tuned"].piece, model=model or self.name,
                                        stream=stream, with_logprobs=logprobs is not None, include_usage=include_usage)

    def create_chat_completion(self, messages: Sequence[Message], *, stream: bool = False, model: str | None = None,
                               logprobs: bool = False, top_logprobs: int | None = None, include_usage: bool = False,
                               **options: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """The reply to a chat as the dict llama-cpp-python's ``create_chat_completion`` returns
        (``stream=True``: chunk dicts). ``logprobs=True`` and ``top_logprobs=k`` report the
        combined distribution; other options as for ``stream``.
        """
        if top_logprobs is not None and not logprobs:
            raise EFTError("top_logprobs needs logprobs")
        chunks = self.stream(messages=list(messages), logprobs=(top_logprobs or 0) if logprobs else None, **options)
        return openai_format.chat_completion(chunks, self.model_set.by_role["tuned"].piece, model=model or self.name,
                                             stream=stream, with_logprobs=logprobs, include_usage=include_usage)

    def chat(self, messages: Sequence[Message], **options: Any) -> Completion:
        """Reply to a chat (a list of {"role", "content"} messages)."""
        return self.generate(messages=messages, **options)

    def stream_chat(self, messages: Sequence[Message], **options: Any) -> Iterator[Chunk]:
        """Stream a reply to a chat."""
        return self.stream(messages=messages, **options)
