"""The loaded models of one EFT and their combination.

``ModelSet`` owns everything with state: the model contexts (one per distinct file and view),
which role each plays, the deltas and their weights, and how one position's rows combine into
the distribution tokens are drawn from. Decoding strategies (``plain.plain_tokens``,
``speculative.speculative_tokens``, the ``batched.Batcher``) and ``explain`` take it as an
argument; ``EFT`` is the facade that adds prompts, options and results.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..chat.template import ChatTemplate
from ..core.combine import eft_logprobs, log_softmax
from ..core.deltas import Delta, check_weight, role_names
from ..core.errors import EFTError
from ..core.interrupts import sigint_deferred
from ..core.params import Plausibility
from ..core.sampling import plausible
from ..runtime.backend import Backend, default_threads
from ..runtime.context import LocalBackend
from ..runtime.rpc import RPCBackend, parse_endpoints, require_rpc
from ..runtime.vocab import VocabReport, check_vocabularies, read_vocab
from .threads import LoadThreads

BASE_PROMPTS = ("same", "plain")
# Measured on 2 cores (see README): three small models decode faster one after another,
# each with every core, than side by side in threads.
DEFAULT_CONCURRENT = False


@dataclass(frozen=True)
class Mix:
    """How one call combines the models: the deltas' weights and the plausibility filter."""

    weights: tuple[float, ...]
    plausibility: Plausibility = Plausibility()


class ModelSet:
    """``base`` and the deltas, loaded and checked.

    Roles are ``base``, ``tuned``, ``reference`` for the first delta and ``tuned2``,
    ``reference2``, ... for the next; ``by_role`` maps each to its Backend. A file in several
    roles with the same view (``base_prompt`` "plain" gives base and references a plain
    transcript) is loaded and evaluated once: ``backends`` lists the distinct ones. With ``rpc``
    the base runs on llama.cpp RPC servers (``RPCBackend``).
    """

    def __init__(self, base: str | os.PathLike, deltas: Sequence[Delta], *, n_ctx: int,
                 n_threads: int | Mapping[str, int] | None, n_gpu_layers: int | Mapping[str, int],
                 concurrent: bool | None, base_prompt: str, rpc: str | Sequence[str] | None = None):
        if base_prompt not in BASE_PROMPTS:
            raise EFTError(f"base_prompt must be one of {BASE_PROMPTS}, got {base_prompt!r}")
        if n_ctx < 8:
            raise EFTError(f"context size must be at least 8 tokens, got {n_ctx}")
        if not deltas:
            raise EFTError("give a tuned and a reference model (or deltas)")
        self.base_prompt = base_prompt
        self.draft_tuner = None  # speculative.DraftTuner of ``speculative="auto"``, kept across calls
        self._end_tokens: tuple[int, ...] | None = None
        paths = {"base": os.fspath(base)}
        self.delta_roles: list[tuple[str, str]] = []  # (tuned role, reference role) of each delta
        self.weights: list[float] = []
        for i, delta in enumerate(deltas, 1):
            t, r = role_names(i)
            paths[t], paths[r] = delta.tuned, delta.reference
            self.delta_roles.append((t, r))
            self.weights.append(delta.weight)
        self.roles = list(paths)
        # The check reads only GGUF headers, so a bad set fails before any weights load.
        self.vocabs = {role: read_vocab(p) for role, p in paths.items()}
        self.report: VocabReport = check_vocabularies(self.vocabs)
        self.n_shared = self.report.n_shared
        # Compiled once here: compiling it again for every request would cost more than rendering.
        self.chat_template = ChatTemplate.from_vocab(self.vocabs["tuned"])

        keys = {role: (os.path.realpath(paths[role]), self.view(role)) for role in self.roles}
        unique = list(dict.fromkeys(keys.values()))
        self.concurrent = DEFAULT_CONCURRENT if concurrent is None else bool(concurrent)
        cores = default_threads()
        threads = per_role(n_threads, "n_threads", max(1, cores // len(unique)) if self.concurrent else cores, self.roles)
        gpu_layers = per_role(n_gpu_layers, "n_gpu_layers", 0, self.roles)
        check_threads(threads)
        for role, n in gpu_layers.items():
            if n < -1:
                raise EFTError(f"n_gpu_layers must be -1 (all) or more, got {n} for {role}")
        # On RPC servers the base gets all its layers there unless n_gpu_layers says how many.
        self.rpc = None if rpc is None else parse_endpoints(rpc)
        if self.rpc:
            require_rpc()
            gpu_layers["base"] = gpu_layers["base"] or -1
        self._pool: ThreadPoolExecutor | None = None
        self._loaded: dict[tuple[str, str], Backend] = {}
        self.by_role: dict[str, Backend] = {}
        # The context is capped at each model's trained length; errors say so when it was.
        self.requested_ctx = n_ctx
        try:
            for role in self.roles:
                if keys[role] not in self._loaded:
                    ctx = min(n_ctx, self.vocabs[role].context_length or n_ctx)
                    kind = RPCBackend if role == "base" and self.rpc else LocalBackend
                    where = dict(endpoints=self.rpc) if kind is RPCBackend else {}
                    self._loaded[keys[role]] = kind(paths[role], **where, n_ctx=ctx, n_threads=threads[role],
                                                    n_gpu_layers=gpu_layers[role])
                self.by_role[role] = self._loaded[keys[role]]
                if self.by_role[role].n_vocab != self.vocabs[role].n_vocab:
                    raise EFTError(
                        f"{paths[role]}: llama.cpp reports {self.by_role[role].n_vocab} tokens, "
                        f"the GGUF lists {self.vocabs[role].n_vocab}"
                    )
        except BaseException:
            self.close()
            raise
        if self.concurrent and len(unique) > 1:
            self._pool = ThreadPoolExecutor(max_workers=len(unique), thread_name_prefix="eft")
        # Threads nobody chose hold under load: fewer while other programs keep cores busy.
        self.threads = LoadThreads(cores) if n_threads is None and not self.concurrent and cores > 1 else None

    def view(self, role: str) -> str:
        """What ``role`` sees: the chat as rendered ("chat") or a plain transcript ("plain")."""
        return "plain" if self.base_prompt == "plain" and not role.startswith("tuned") else "chat"

    @property
    def backends(self) -> list[Backend]:
        """The distinct loaded models (a file in two roles with one view counts once)."""
        return list(self._loaded.values())

    @property
    def n_ctx(self) -> int:
        """The smallest context of the models."""
        return min(b.n_ctx for b in self.backends)

    def close(self) -> None:
        """Free every llama.cpp context and model."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for backend in self._loaded.values():
            backend.close()
        self._loaded.clear()

    # --- weights -----------------------------------------------------------------------------

    def checked_weights(self, weights: Sequence[float] | None) -> list[float]:
        """``weights`` checked against the deltas (None: the current ones)."""
        if weights is None:
            return list(self.weights)
        if len(weights) != len(self.delta_roles):
            raise EFTError(f"{len(weights)} weights given for {len(self.delta_roles)} deltas")
        return [check_weight(w) for w in weights]

    def mix(self, weights: Sequence[float] | None, plausibility: Plausibility = Plausibility()) -> Mix:
        return Mix(tuple(self.checked_weights(weights)), plausibility)

    # --- running the models ------------------------------------------------------------------

    def run(self, work: Callable[[Backend], object]) -> None:
        """Run ``work`` on every distinct model, in threads when concurrent."""
        self.run_on(self.backends, work)

    def run_on(self, backends: Sequence[Backend], work: Callable[[Backend], object]) -> None:
        """Run ``work`` on ``backends``, in threads when concurrent; default threads follow the
        cores' load here, so every decoding strategy's steps do."""
        self.adjust_threads()
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

    def adjust_threads(self, now: bool = False) -> None:
        """Follow the cores' load with the default threads (``now``: a generation starts)."""
        if self.threads is not None:
            before = self.threads.current
            if self.threads.choose(now) != before:
                set_threads(self.backends, self.threads.current)

    def needed(self, mix: Mix) -> list[Backend]:
        """The models ``mix`` reads: the base, each delta with a non-zero weight, the plausibility
        filter's model. At weight 0 on every delta only the base runs; a model left out falls
        behind and catches up at the next prefill that needs it (``Backend.sync``).
        """
        roles = ["base"] + [role for pair, w in zip(self.delta_roles, mix.weights) if w != 0 for role in pair]
        if mix.plausibility.active:
            roles.append(mix.plausibility.model)
        keep = {id(self.by_role[role]) for role in roles}
        return [b for b in self.backends if id(b) in keep]

    def combined(self, mix: Mix) -> np.ndarray:
        """Combined log-probabilities at the last evaluated position of the models ``mix`` reads."""
        return self.combine_rows({b: log_softmax(b.logits()) for b in self.needed(mix)}, mix)

    def combine_rows(self, logp: Mapping[Backend, np.ndarray], mix: Mix | Sequence[Mix]) -> np.ndarray:
        """The distribution tokens are sampled from at one position (before the sampler's own
        filters), from each distinct model's log-probabilities there: the EFT combination, then
        the plausibility filter. Generation, speculative verification and ``explain`` all use it.

        The batched decoder passes 2-D rows, one per sequence, and one Mix per row; each row
        comes out as it would alone.
        """
        m = self.by_role
        if isinstance(mix, Mix):
            weights, filters = mix.weights, [mix.plausibility]
        else:
            weights = np.array([x.weights for x in mix], dtype=np.float64).reshape(len(mix), len(self.delta_roles)).T
            filters = [x.plausibility for x in mix]
        # A delta weighted 0 everywhere adds nothing, and its models may not have run.
        combined = eft_logprobs(
            logp[m["base"]],
            [(logp[m[t]], logp[m[r]], w) for (t, r), w in zip(self.delta_roles, weights) if np.any(w)],
            self.n_shared,
        )
        for i, f in enumerate(filters):
            if f.active:
                if combined.ndim == 1:
                    combined = plausible(combined, logp[m[f.model]], f.top_p, f.min_p)
                else:
                    combined[i] = plausible(combined[i], logp[m[f.model]][i], f.top_p, f.min_p)
        return combined

    def end_tokens(self) -> tuple[int, ...]:
        """The tuned model's end-of-generation ids within the shared vocabulary."""
        if self._end_tokens is None:
            tuned = self.by_role["tuned"]
            self._end_tokens = tuple(t for t in range(self.n_shared) if tuned.is_eog(t))
        return self._end_tokens

    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Raise EFTError unless ``tokens`` is a prompt the models can evaluate."""
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


def set_threads(backends: Sequence[Backend], n: int) -> None:
    """``n`` threads for each backend whose context is in this process."""
    for b in backends:
        context = getattr(b, "context", None)
        if context is not None:
            context.set_threads(n)


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
