"""The EFT combination, as pure NumPy functions on one position's logits.

    logp = log_softmax(base) + sum_i w_i * (log_softmax(tuned_i) - log_softmax(ref_i)),
    renormalised with log_softmax.

Computed in float64: log-softmaxing float32 logits in float32 can round two distinct logits to
the same value and change a greedy argmax.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities of logits ``x`` along its last axis (float64; -inf entries stay -inf).

    A 2-D array is one row per sequence (the batched engine); each row comes out exactly as it
    would alone.
    """
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    if not np.isfinite(m).all():
        raise ValueError("logits have no finite maximum")
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def eft_logprobs(
    base: np.ndarray,
    deltas: Sequence[tuple[np.ndarray, np.ndarray, float | np.ndarray]],
    n_shared: int,
) -> np.ndarray:
    """Combined next-token log-probabilities over the shared ids ``[0, n_shared)``.

    ``base`` and every ``(tuned, reference, weight)`` are log-probabilities (or raw logits:
    each model's constant cancels in the final renormalisation). Each array may be longer
    than ``n_shared`` (padded vocabularies); ids past it are not part of the result.
    """
    return log_softmax(eft_scores(base, deltas, n_shared))


def eft_scores(
    base: np.ndarray,
    deltas: Sequence[tuple[np.ndarray, np.ndarray, float | np.ndarray]],
    n_shared: int,
) -> np.ndarray:
    """``base + sum_i w_i * (tuned_i - ref_i)`` over the shared ids, before renormalisation.

    With 2-D rows (one per sequence) each weight may be an array with one weight per row.
    """
    total = np.array(base[..., :n_shared], dtype=np.float64)
    for tuned, ref, weight in deltas:
        add_delta(total, tuned, ref, weight)
    return total


def add_delta(total: np.ndarray, tuned: np.ndarray, ref: np.ndarray, weight: float | np.ndarray) -> np.ndarray:
    """Add one delta's term ``weight * (tuned - ref)`` to ``total`` in place; returns ``total``.

    A token that a model with non-zero weight rules out (-inf) stays ruled out, so two -inf
    values are never subtracted. Adding to zeros gives the term alone (what ``explain`` shows).
    ``weight`` is a number, or one per row of 2-D arrays.
    """
    w = np.asarray(weight, dtype=np.float64)
    if not w.any():
        return total
    n = total.shape[-1]
    t = tuned[..., :n]
    r = ref[..., :n]
    ruled_out = np.isneginf(t) | np.isneginf(r)
    if w.ndim:
        w = w[:, None]
        ruled_out &= w != 0
    with np.errstate(invalid="ignore"):
        term = w * np.subtract(t, r, dtype=np.float64)
    if w.ndim:
        # A row whose weight is 0 gets nothing from this delta, whatever its models rule out.
        term[np.broadcast_to(w == 0, term.shape)] = 0.0
    total += term
    if ruled_out.any():
        total[ruled_out] = -np.inf
    return total
