"""Plain EFT decoding: one token per step over a ``ModelSet``.

The step reads like the algorithm: combine every model's row at the last position, sample,
append the token to every model. (``speculative.speculative_tokens`` is the other strategy.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..core.interrupts import sigint_deferred
from ..core.sampling import Sampler

if TYPE_CHECKING:
    from .model_set import Mix, ModelSet


@dataclass
class StepTiming:
    """Where the time of non-speculative steps went."""

    forward_seconds: float = 0.0
    combine_seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        return {"forward_seconds": round(self.forward_seconds, 4), "combine_sample_seconds": round(self.combine_seconds, 4)}


def plain_tokens(model_set: "ModelSet", sampler: Sampler, rng: np.random.Generator, mix: "Mix",
                 timing: StepTiming) -> Iterator[tuple[int, np.ndarray]]:
    """After a prefill, yield each token with the combined distribution it was drawn from.

    Only the models ``mix`` reads are evaluated (at weight 0: the base alone).
    """
    needed = model_set.needed(mix)
    while True:
        t0 = time.perf_counter()
        logp = model_set.combined(mix)
        token = sampler.sample(logp, rng)
        timing.combine_seconds += time.perf_counter() - t0
        yield token, logp
        if any(len(b.tokens) >= b.n_ctx for b in needed):
            return
        t1 = time.perf_counter()
        # One deferral for all models' one-token decodes (each would otherwise swap handlers).
        with sigint_deferred():
            model_set.run_on(needed, lambda b: b.eval([token]))
        timing.forward_seconds += time.perf_counter() - t1
