"""Sampling filters, the Sampler settings and the CDF draw, on hand-made distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eft_local.core.combine import log_softmax
from eft_local.core.sampling import (
    _TOP_P_PREFIX, Sampler, apply_min_p, apply_top_k, apply_top_p, draw,
)

P4 = np.array([0.5, 0.3, 0.15, 0.05])
L4 = np.log(P4)
OFF = dict(top_k=0, top_p=1.0, min_p=0.0)  # every filter disabled


def kept(logp: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(logp)).tolist())


# -- top-k -------------------------------------------------------------------------------------


def test_top_k_keeps_exactly_k_most_likely():
    lp = np.log([0.1, 0.4, 0.2, 0.3])
    out = apply_top_k(lp, 2)
    assert kept(out) == {1, 3}
    np.testing.assert_array_equal(out[[1, 3]], lp[[1, 3]])  # values are not renormalised
    assert kept(apply_top_k(lp, 1)) == {1}
    assert kept(apply_top_k(lp, 3)) == {1, 2, 3}


def test_top_k_keeps_exactly_k_among_ties():
    out = apply_top_k(np.zeros(10), 3)
    assert len(kept(out)) == 3


@pytest.mark.parametrize("k", [0, -1, 4, 100])
def test_top_k_disabled_or_wider_than_vocab_keeps_all(k):
    np.testing.assert_array_equal(apply_top_k(L4, k), L4)


# -- top-p -------------------------------------------------------------------------------------
# Convention (llama.cpp's): keep the smallest set of most likely ids whose cumulative probability
# is >= p. For [0.5, 0.3, 0.15, 0.05] the cumulative sums are [0.5, 0.8, 0.95, 1.0].


@pytest.mark.parametrize(
    "p, n",
    [(0.3, 1), (0.5, 1), (0.51, 2), (0.79, 2), (0.81, 3), (0.9, 3), (0.96, 4), (0.999, 4)],
)
def test_top_p_keeps_smallest_prefix_reaching_p(p, n):
    assert kept(apply_top_p(L4, p)) == set(range(n))


def test_top_p_exact_boundary_keeps_two():
    # exp(log(0.3) - log(0.5)) rounds down, so 0.5 + 0.3 sums to 0.7999999999999999 < 0.8.
    assert kept(apply_top_p(L4, 0.8)) == {0, 1}


def test_top_p_at_least_one_and_p_one_keeps_all():
    assert kept(apply_top_p(L4, 1e-9)) == {0}
    np.testing.assert_array_equal(apply_top_p(L4, 1.0), L4)


def test_top_p_renormalises_over_ids_still_in_play():
    # After top-k 2 the live probabilities are [0.625, 0.375]: p = 0.6 keeps one, 0.7 keeps both.
    lp = apply_top_k(L4, 2)
    assert kept(apply_top_p(lp, 0.6)) == {0}
    assert kept(apply_top_p(lp, 0.7)) == {0, 1}
    # Unnormalised input (a constant offset) gives the same set.
    assert kept(apply_top_p(L4 + 12.0, 0.81)) == {0, 1, 2}


def _top_p_brute_force(logp: np.ndarray, p: float) -> set[int]:
    ids = np.flatnonzero(np.isfinite(logp))
    pr = np.exp(logp[ids] - logp[ids].max())
    pr /= pr.sum()
    order = np.argsort(-pr)
    cum = np.cumsum(pr[order])
    n = int(np.argmax(cum >= p)) + 1
    return set(ids[order[:n]].tolist())


def _large_vocab(scale: float, n: int = 5000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lp = rng.standard_normal(n) * scale
    lp[rng.choice(n, 300, replace=False)] = -np.inf  # ids already filtered out must stay out
    return lp


def _head_mass(lp: np.ndarray) -> float:
    live = lp[np.isfinite(lp)]
    pr = np.exp(live - live.max())
    pr /= pr.sum()
    return float(np.sort(pr)[::-1][:_TOP_P_PREFIX].sum())


@pytest.mark.parametrize(
    "scale, p, head_reaches_p",
    [
        (3.0, 0.9, True),  # peaked: the top 1024 candidates already hold p
        (3.0, 0.5, True),
        (0.3, 0.9, False),  # flat: the shortcut fails and the full sort decides
        (0.3, 0.5, False),
    ],
)
def test_top_p_large_vocab_matches_brute_force(scale, p, head_reaches_p):
    lp = _large_vocab(scale)
    assert len(kept(lp)) > _TOP_P_PREFIX
    assert (_head_mass(lp) >= p) == head_reaches_p  # the case exercises the intended path
    out = apply_top_p(lp, p)
    expected = _top_p_brute_force(lp, p)
    assert kept(out) == expected
    assert len(expected) > 1
    ids = sorted(expected)
    np.testing.assert_array_equal(out[ids], lp[ids])


# -- min-p -------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_p, n", [(0.05, 4), (0.11, 3), (0.25, 3), (0.31, 2), (0.61, 1), (1.0, 1)])
def test_min_p_threshold_is_relative_to_the_max(min_p, n):
    # Thresholds: 0.5 * min_p; e.g. 0.25 -> 0.125 keeps 0.15, 0.31 -> 0.155 drops it.
    assert kept(apply_min_p(L4, min_p)) == set(range(n))
    # Relative to the max, not to a sum: an offset changes nothing.
    assert kept(apply_min_p(L4 - 30.0, min_p)) == set(range(n))


def test_min_p_zero_keeps_all():
    np.testing.assert_array_equal(apply_min_p(L4, 0.0), L4)


# -- log_softmax renormalises ---------------------------------------------------------------


def test_log_softmax_renormalises():
    out = log_softmax(np.log([2.0, 6.0]))
    np.testing.assert_allclose(np.exp(out), [0.25, 0.75], rtol=0, atol=1e-15)
    np.testing.assert_allclose(log_softmax(out), out, rtol=0, atol=1e-15)
    masked = log_softmax(np.array([1.0, -np.inf, 1.0]) + 800.0)  # large values must not overflow
    assert masked[1] == -np.inf
    np.testing.assert_allclose(np.exp(masked[[0, 2]]), [0.5, 0.5], atol=1e-15)


# -- Sampler -----------------------------------------------------------------------------------


def test_sampler_defaults_are_llama_cpp_defaults():
    s = Sampler()
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.8, 40, 0.95, 0.05)
    assert not s.greedy


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=-0.01), "min_p"),
        (dict(min_p=1.01), "min_p"),
        (dict(min_p=float("nan")), "min_p"),
    ],
)
def test_sampler_rejects_bad_settings_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sampler(**kwargs)


def test_sampler_accepts_edge_settings():
    Sampler(temperature=0, top_k=0, top_p=1.0, min_p=0.0)
    Sampler(min_p=1.0, top_p=1e-6)


def test_greedy_returns_argmax_and_one_hot_distribution():
    lp = np.log([0.2, 0.1, 0.45, 0.25])
    s = Sampler(temperature=0)
    assert s.greedy
    rng = np.random.default_rng(0)
    assert all(s.sample(lp, rng) == 2 for _ in range(20))
    dist = s.distribution(lp)
    np.testing.assert_array_equal(np.exp(dist), [0.0, 0.0, 1.0, 0.0])


def test_temperature_scales_log_probabilities():
    # T = 2 on [0.64, 0.36]: sqrt gives [0.8, 0.6], renormalised [4/7, 3/7].
    s = Sampler(temperature=2.0, **OFF)
    out = s.distribution(np.log([0.64, 0.36]))
    np.testing.assert_allclose(np.exp(out), [4 / 7, 3 / 7], rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.distribution(L4), log_softmax(L4 / 2), rtol=0, atol=1e-15)
    # T < 1 sharpens: T = 0.5 squares, [0.64, 0.36] -> [0.4096, 0.1296] / 0.5392.
    sharp = Sampler(temperature=0.5, **OFF).distribution(np.log([0.64, 0.36]))
    np.testing.assert_allclose(np.exp(sharp), np.array([0.4096, 0.1296]) / 0.5392, atol=1e-15)


def test_distribution_applies_filters_then_renormalises():
    # top-k 3 -> [0.5, 0.3, 0.15]; top-p 0.9 on those (0.526, 0.842, 1.0) keeps 3;
    # min-p 0.4 (threshold 0.2) drops 0.15: [0.5, 0.3] -> [0.625, 0.375].
    s = Sampler(temperature=1.0, top_k=3, top_p=0.9, min_p=0.4)
    np.testing.assert_allclose(np.exp(s.distribution(L4)), [0.625, 0.375, 0.0, 0.0], rtol=0, atol=1e-15)


# -- draw --------------------------------------------------------------------------------------


def _upper_normal_quantile(alpha: float) -> float:
    """z with P(Z > z) = alpha, by bisection on erfc (no scipy)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > alpha:
            lo = mid
        else:
            hi = mid
    return lo


def chi2_critical(dof: int, alpha: float) -> float:
    """Wilson-Hilferty approximation of the upper-alpha chi-square quantile."""
    z = _upper_normal_quantile(alpha)
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


def chi2_stat(counts: np.ndarray, p: np.ndarray) -> float:
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_chi2_critical_value_is_close_to_the_table():
    # Tables: chi2_{0.9999}(4) = 23.51, chi2_{0.95}(4) = 9.488.
    assert abs(chi2_critical(4, 1e-4) - 23.51) < 1.0
    assert abs(chi2_critical(4, 0.05) - 9.488) < 0.2


def test_draw_frequencies_match_probabilities():
    p = np.array([0.5, 0.0, 0.25, 0.15, 0.07, 0.03])
    with np.errstate(divide="ignore"):
        lp = np.log(p)  # id 1 is -inf: ruled out
    rng = np.random.default_rng(1234)
    n = 20000
    counts = np.bincount([draw(lp, rng) for _ in range(n)], minlength=len(p))
    assert counts[1] == 0
    live = p > 0
    stat = chi2_stat(counts[live], p[live])
    crit = chi2_critical(int(live.sum()) - 1, 1e-4)  # ~23.5 for 4 degrees of freedom
    assert stat < crit
    # The test has power: expected frequencies off by one id (e.g. an off-by-one in the CDF search)
    # are rejected by a wide margin.
    shifted = np.roll(p[live], 1)
    assert chi2_stat(counts[live], shifted) > 20 * crit


def test_draw_never_picks_zero_probability_ids():
    lp = np.array([-np.inf, 0.0, -np.inf, -800.0, -np.inf])  # exp(-800) underflows to 0
    rng = np.random.default_rng(0)
    assert {draw(lp, rng) for _ in range(500)} == {1}


def test_sampling_is_reproducible_for_a_seed():
    s = Sampler(temperature=1.0, **OFF)
    lp = np.log(np.full(50, 1 / 50))
    r1, r2, r3 = (np.random.default_rng(seed) for seed in (7, 7, 8))
    a = [s.sample(lp, r1) for _ in range(40)]
    b = [s.sample(lp, r2) for _ in range(40)]
    c = [s.sample(lp, r3) for _ in range(40)]
    assert a == b
    assert a != c
    assert len(set(a)) > 10  # draws actually vary


def test_banned_ids_are_never_chosen():
    logp = np.log(np.array([0.7, 0.2, 0.1]))
    greedy = Sampler(temperature=0, banned=(0,))
    assert greedy.sample(logp, np.random.default_rng(0)) == 1
    assert np.exp(greedy.distribution(logp))[1] == 1.0
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, banned=(0, 7))
    np.testing.assert_allclose(np.exp(s.distribution(logp)), [0.0, 2 / 3, 1 / 3])
    rng = np.random.default_rng(1)
    assert 0 not in {s.sample(logp, rng) for _ in range(200)}
