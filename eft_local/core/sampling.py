"""Samplers as pure functions on a log-probability vector.

Each filter maps log-probabilities to log-probabilities with excluded ids set to -inf. The
order follows llama.cpp's default chain: top-k, top-p, min-p, then temperature. A temperature
of 0 means greedy decoding (argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .combine import log_softmax

# Above this many candidates, top-p first tries the most likely ones (a full sort of a
# 262k vocabulary every token would cost more than the filter is worth).
_TOP_P_PREFIX = 1024


def apply_top_k(logp: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` most likely ids (``k`` <= 0 keeps all)."""
    if k <= 0 or k >= logp.shape[-1]:
        return logp
    keep = np.argpartition(-logp, k - 1)[:k]
    out = np.full_like(logp, -np.inf)
    out[keep] = logp[keep]
    return out


def apply_top_p(logp: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely ids whose probability reaches ``p`` (``p`` >= 1 keeps all).

    Probabilities are those of the ids still in play, renormalised (as llama.cpp does).
    """
    if p >= 1.0:
        return logp
    ids = np.flatnonzero(np.isfinite(logp))
    vals = logp[ids]
    probs = np.exp(vals - vals.max())
    probs /= probs.sum()
    # exp/log rounding can leave a prefix that sums to p exactly (0.5 + 0.3 for p = 0.8) an ulp short.
    target = p * (1 - 1e-9)
    if len(ids) > _TOP_P_PREFIX:
        head = np.argpartition(-vals, _TOP_P_PREFIX - 1)[:_TOP_P_PREFIX]
        if probs[head].sum() >= target:
            ids, vals, probs = ids[head], vals[head], probs[head]
    order = np.argsort(-vals, kind="stable")
    cum = np.cumsum(probs[order])
    n_keep = int(np.searchsorted(cum, target, side="left")) + 1
    keep = ids[order[:n_keep]]
    out = np.full_like(logp, -np.inf)
    out[keep] = logp[keep]
    return out


def apply_min_p(logp: np.ndarray, p: float) -> np.ndarray:
    """Keep ids whose probability is at least ``p`` times the most likely one's (``p`` <= 0 keeps all)."""
    if p <= 0.0:
        return logp
    threshold = np.max(logp) + np.log(p)
    return np.where(logp >= threshold, logp, -np.inf)


def plausible(logp: np.ndarray, component: np.ndarray, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Conservative decoding: ``logp`` restricted to the tokens ``component`` finds plausible.

    A token stays when it is inside ``component``'s top-p nucleus and at least ``min_p`` times
    its most likely token's probability (contrastive decoding's plausibility mask); the rest
    get -inf and the distribution is renormalised. ``component`` is one model's
    log-probabilities over the same ids (the tuned or the base model).
    """
    keep = np.isfinite(apply_min_p(apply_top_p(component[: len(logp)], top_p), min_p))
    out = np.where(keep, logp, -np.inf)
    if not np.isfinite(out).any():
        # The combination ruled out every plausible token: keep the component's own choice.
        out[int(np.argmax(component[: len(logp)]))] = 0.0
    return log_softmax(out)


@dataclass(frozen=True)
class Sampler:
    """Sampling settings, applied to the combined EFT distribution.

    Defaults are llama.cpp's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    banned: tuple[int, ...] = ()  # ids never sampled (end tokens with ignore_eos)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def distribution(self, logp: np.ndarray) -> np.ndarray:
        """The log-probabilities a token is actually drawn from (filters, then temperature)."""
        logp = self._ban(logp)
        if self.greedy:
            out = np.full_like(logp, -np.inf)
            out[int(np.argmax(logp))] = 0.0
            return out
        x = apply_min_p(apply_top_p(apply_top_k(logp, self.top_k), self.top_p), self.min_p)
        return log_softmax(x / self.temperature)

    def sample(self, logp: np.ndarray, rng: np.random.Generator) -> int:
        """Draw one token id from ``logp`` (argmax when greedy)."""
        if self.greedy:
            return int(np.argmax(self._ban(logp)))
        return draw(self.distribution(logp), rng)

    def _ban(self, logp: np.ndarray) -> np.ndarray:
        if not self.banned:
            return logp
        out = logp.copy()
        out[[t for t in self.banned if t < len(out)]] = -np.inf
        return out


def draw(logp: np.ndarray, rng: np.random.Generator) -> int:
    """Draw an id from normalised log-probabilities by inverting the CDF of the live ids."""
    ids = np.flatnonzero(np.isfinite(logp))
    cdf = np.cumsum(np.exp(logp[ids]))
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(ids[min(i, len(ids) - 1)])
