"""What one request asks for: the single source of option names, defaults, help and checks.

The Python API, the command line and the HTTP server all build a ``SamplingParams``. Each field
declares its default (llama.cpp's where llama.cpp has one), its help and its command-line flags
(llama.cpp's spellings first); the CLI options and the server's request fields are derived from
these fields, and every bad value becomes one ``EFTError`` line that names the option.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .deltas import check_weight
from .errors import EFTError
from .sampling import Sampler
from .text import check_text

# Longest draft the speculative decoder takes per verification.
MAX_DRAFT = 16
# Most alternatives reported per token (OpenAI's top_logprobs allows 20).
MAX_TOP_LOGPROBS = 20
PLAUSIBLE_MODELS = ("tuned", "base")


def option(default: Any, help: str, *flags: str, http: bool = True, aliases: tuple[str, ...] = (),
           **cli: Any) -> Any:
    """A field of SamplingParams with its help, its command-line ``flags`` (none: API and HTTP
    only) and any further click settings; ``http`` False keeps it out of the server's request
    fields, which take ``aliases`` as other names for it."""
    return field(default=default, metadata={"help": help, "flags": flags, "http": http, "aliases": aliases,
                                            "cli": cli})


@dataclass(frozen=True)
class Plausibility:
    """Conservative decoding: sample only tokens that ``model`` (tuned or base) finds plausible."""

    top_p: float = 1.0
    min_p: float = 0.0
    model: str = "tuned"

    def __post_init__(self) -> None:
        if self.model not in PLAUSIBLE_MODELS:
            raise EFTError(f"the plausibility model must be tuned or base, got {self.model!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise EFTError(f"plausible top-p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise EFTError(f"plausible min-p must be in [0, 1], got {self.min_p!r}")

    @property
    def active(self) -> bool:
        return self.top_p < 1 or self.min_p > 0


@dataclass(frozen=True)
class SamplingParams:
    """Options of one generation, checked and normalised when built.

    ``temperature`` 0 (or less) is greedy; ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 turn those filters
    off. ``stop`` takes a string or a list. ``seed`` None or -1 is random. ``speculative`` is a
    draft length, "auto" or None/0/"off". ``weights`` overrides the deltas' weights for this
    call. ``logprobs`` asks for each token's log-probability under the combined distribution and
    that many alternatives (0: the chosen token's only).
    """

    max_tokens: int = option(512, "Most tokens to generate.", "--max-tokens", "--n-predict", "-n",
                             aliases=("max_completion_tokens", "num_predict"))
    temperature: float = option(0.8, "0 or less means greedy.", "--temperature", "--temp")
    top_k: int = option(40, "0 disables.", "--top-k")
    top_p: float = option(0.95, "1 disables.", "--top-p")
    min_p: float = option(0.05, "0 disables.", "--min-p")
    seed: int | None = option(None, "Random seed (same seed, same output; -1: random).", "--seed", "-s", type=int)
    stop: tuple[str, ...] = option((), "Stop at this string (repeatable); it is not printed.", "--stop", multiple=True)
    speculative: int | str | None = option(
        None, "Speculative decoding: the tuned model drafts K tokens per verification ('auto' adapts K; 0 or "
        "'off': plain decoding, the default). Same output distribution.", "--speculative", metavar="K|auto|off")
    ignore_eos: bool = option(False, "Never sample the end tokens (always --max-tokens tokens).", "--ignore-eos",
                              is_flag=True)
    weights: tuple[float, ...] | None = option(None, "Every delta's weight for this request.")
    plausible_top_p: float = option(
        1.0, "Conservative decoding: only tokens inside this top-p nucleus of --plausible-model.", "--plausible-top-p")
    plausible_min_p: float = option(
        0.0, "Conservative decoding: only tokens at least this times --plausible-model's top probability.",
        "--plausible-min-p")
    plausible_model: str = option("tuned", "The model whose distribution decides what is plausible.",
                                  "--plausible-model", choices=PLAUSIBLE_MODELS)
    context_shift: bool = option(
        False, "When a chat no longer fits the context, leave out its oldest turns (never the system message).",
        "--context-shift/--no-context-shift")
    # Each HTTP endpoint asks for log-probabilities in its own OpenAI shape.
    logprobs: int | None = option(None, "Each token's log-probability and this many alternatives.", http=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen
        set_("max_tokens", check_int(self.max_tokens, "max_tokens", 1))
        set_("top_k", check_int(self.top_k, "top_k", 0))
        for name in ("temperature", "top_p", "min_p"):
            if not _is_number(getattr(self, name)):
                raise EFTError(f"{name} must be a number, got {getattr(self, name)!r}")
        if self.temperature < 0:  # llama.cpp's rule: a temperature of 0 or less samples greedily
            set_("temperature", 0.0)
        try:
            Sampler(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        except ValueError as e:
            raise EFTError(str(e)) from None
        set_("seed", check_seed(self.seed))
        set_("stop", tuple(check_stop(self.stop)))
        set_("speculative", check_speculative(self.speculative))
        for name in ("ignore_eos", "context_shift"):
            if not isinstance(getattr(self, name), bool):
                raise EFTError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.weights is not None:
            if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Sequence):
                raise EFTError(f"weights must be a list of numbers, got {self.weights!r}")
            set_("weights", tuple(check_weight(w) for w in self.weights))
        self.plausibility  # checks the three plausible_* options
        if self.logprobs is not None:
            set_("logprobs", check_int(self.logprobs, "logprobs", 0, MAX_TOP_LOGPROBS))
            if self.speculative:
                raise EFTError("logprobs are not available with speculative decoding")

    @classmethod
    def create(cls, base: "SamplingParams | None" = None, **options: Any) -> "SamplingParams":
        """``base`` (or the defaults) with ``options`` replaced; unknown names are an error."""
        unknown = sorted(set(options) - FIELDS)
        if unknown:
            raise EFTError(f"unknown option {unknown[0]!r}; options are {', '.join(sorted(FIELDS))}")
        return dataclasses.replace(base or DEFAULTS, **options)

    @property
    def plausibility(self) -> Plausibility:
        return Plausibility(self.plausible_top_p, self.plausible_min_p, self.plausible_model)

    def sampler(self, banned: Sequence[int] = ()) -> Sampler:
        """The sampler these options describe (``banned``: ids never drawn)."""
        return Sampler(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                       banned=tuple(banned))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """An integer option within ``[low, high]`` (floats with an integer value pass, as JSON sends them)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise EFTError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def check_seed(seed: Any) -> int | None:
    """None or -1 (a random seed, as in llama.cpp), or a non-negative integer."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed == -1):
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EFTError(f"seed must be a non-negative integer (or -1 for a random one), got {seed!r}")
    return seed


def check_stop(stop: Any) -> list[str]:
    """Stop strings: one string or a list of strings (None or empty: none)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    try:
        stops = list(stop)
    except TypeError:
        stops = None
    if stops is None or not all(isinstance(s, str) for s in stops):
        raise EFTError(f"stop must be a string or a list of strings, got {stop!r}")
    for s in stops:
        check_text(s, "a stop string")
    return stops


def check_speculative(value: Any) -> int | str | None:
    """None or 0 (off), a draft length 1..MAX_DRAFT, or "auto"."""
    if value in (None, 0, "0", "off", False):
        return None
    if value == "auto":
        return "auto"
    try:
        k = int(value) if not isinstance(value, float) or value.is_integer() else -1
    except (TypeError, ValueError):
        k = -1
    if isinstance(value, bool) or not 1 <= k <= MAX_DRAFT:
        raise EFTError(f"speculative must be a draft length from 1 to {MAX_DRAFT} or 'auto', got {value!r}")
    return k


DEFAULTS = SamplingParams()
FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def cli_fields() -> Iterator[dataclasses.Field]:
    """The fields that have command-line flags."""
    return (f for f in dataclasses.fields(SamplingParams) if f.metadata["flags"])


def http_fields() -> Iterator[dataclasses.Field]:
    """The fields a request body may set, under their own names or their aliases."""
    return (f for f in dataclasses.fields(SamplingParams) if f.metadata["http"])
