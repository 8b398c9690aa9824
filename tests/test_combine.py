"""The EFT combination on hand-made logit vectors with hand-computed answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from eft_local.core.combine import eft_logprobs, log_softmax

# Hand-picked distributions whose EFT combinations are exact decimals (see test_hand_example).
P_BASE = np.array([0.4, 0.3, 0.2, 0.1])
P_TUNED = np.array([0.1, 0.2, 0.3, 0.4])
P_REF = np.array([0.25, 0.25, 0.25, 0.25])
LB, LT, LR = np.log(P_BASE), np.log(P_TUNED), np.log(P_REF)


def probs(logp: np.ndarray) -> np.ndarray:
    return np.exp(logp)


# -- log_softmax -------------------------------------------------------------------------------


def test_log_softmax_matches_hand_computation():
    x = [1.0, 2.0, 3.0, -0.5]
    z = math.log(sum(math.exp(v) for v in x))
    out = log_softmax(np.array(x))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [v - z for v in x], rtol=0, atol=1e-15)
    assert math.isclose(probs(out).sum(), 1.0, rel_tol=0, abs_tol=1e-15)


def test_log_softmax_is_shift_invariant_and_does_not_overflow():
    # exp(1000) overflows; the max shift must make this a plain [0.5, 0.5].
    out = log_softmax(np.array([1000.0, 1000.0]))
    np.testing.assert_allclose(out, np.log([0.5, 0.5]), rtol=0, atol=1e-15)
    np.testing.assert_allclose(log_softmax(np.array([3.0, 1.0]) + 500), log_softmax(np.array([3.0, 1.0])), atol=1e-13)


def test_log_softmax_keeps_neg_inf_and_ignores_it_in_the_sum():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = log_softmax(np.array([0.0, -np.inf, 0.0]))
    assert out[1] == -np.inf
    np.testing.assert_allclose(out[[0, 2]], np.log([0.5, 0.5]), atol=1e-15)


def test_log_softmax_without_finite_value_raises():
    with pytest.raises(ValueError, match="finite"):
        log_softmax(np.array([-np.inf, -np.inf]))


# -- eft_logprobs ------------------------------------------------------------------------------


def test_weight_zero_is_the_base_distribution():
    base = np.array([2.0, -1.0, 0.5, 3.0])
    # A wildly different tuned/reference pair must have no effect at weight 0.
    out = eft_logprobs(base, [(np.array([9.0, -9.0, 0.0, 1.0]), np.zeros(4), 0.0)], 4)
    np.testing.assert_array_equal(out, log_softmax(base))


def test_weight_zero_ignores_neg_inf_in_its_models():
    # Documented: only a model with non-zero weight can rule a token out.
    tuned = np.array([0.0, -np.inf, 0.0, 0.0])
    out = eft_logprobs(LB, [(tuned, LR, 0.0)], 4)
    np.testing.assert_array_equal(out, log_softmax(LB))


@pytest.mark.parametrize("weight", [1.0, 2.5, -1.0])
def test_tuned_equal_to_reference_gives_base_exactly(weight):
    tuned = np.array([0.3, -2.0, 1.7, 0.0])
    out = eft_logprobs(LB, [(tuned, tuned.copy(), weight)], 4)
    np.testing.assert_array_equal(out, log_softmax(LB))


def test_hand_example_weight_one():
    # p ∝ base * tuned / ref = [0.16, 0.24, 0.24, 0.16] / 0.25, which sums to 0.8 / 0.25.
    out = eft_logprobs(LB, [(LT, LR, 1.0)], 4)
    np.testing.assert_allclose(probs(out), [0.2, 0.3, 0.3, 0.2], rtol=0, atol=1e-15)


def test_hand_example_weight_two():
    # p ∝ base * (tuned / ref)^2 = [0.4*0.16, 0.3*0.64, 0.2*1.44, 0.1*2.56] = [.064, .192, .288, .256] (sum .8).
    out = eft_logprobs(LB, [(LT, LR, 2.0)], 4)
    np.testing.assert_allclose(probs(out), [0.08, 0.24, 0.36, 0.32], rtol=0, atol=1e-15)


def test_hand_example_negative_weight():
    # w = -1 moves away from the tuned model: p ∝ base * ref / tuned = [1.0, 0.375, 1/6, 0.0625].
    raw = np.array([0.4 / 0.4, 0.3 / 0.8, 0.2 / 1.2, 0.1 / 1.6])
    out = eft_logprobs(LB, [(LT, LR, -1.0)], 4)
    np.testing.assert_allclose(probs(out), raw / raw.sum(), rtol=0, atol=1e-15)


def test_raw_logits_give_the_same_result_as_log_probabilities():
    # Each model's normalising constant is one number per model, which cancels in the renormalisation.
    logits = (LB + 7.25, LT - 3.5, LR + 100.0)
    for w in (1.0, 2.0, 0.5):
        np.testing.assert_allclose(
            eft_logprobs(logits[0], [(logits[1], logits[2], w)], 4),
            eft_logprobs(LB, [(LT, LR, w)], 4),
            rtol=0, atol=1e-12,
        )


def test_n_shared_truncates_every_input():
    # The padded rows hold huge values: if any leaked into the sum they would dominate.
    base = np.concatenate([LB, [50.0, 60.0]])
    tuned = np.concatenate([LT, [80.0]])
    out = eft_logprobs(base, [(tuned, LR, 1.0)], 4)
    assert out.shape == (4,)
    np.testing.assert_allclose(probs(out), [0.2, 0.3, 0.3, 0.2], rtol=0, atol=1e-15)


def test_neg_inf_in_tuned_and_reference_at_the_same_id():
    tuned = LT.copy()
    ref = LR.copy()
    tuned[2] = ref[2] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # -inf - -inf must not even warn
        out = eft_logprobs(LB, [(tuned, ref, 1.0)], 4)
    assert out[2] == -np.inf
    assert not np.isnan(out).any()
    # The remaining ids keep the formula: [0.16, 0.24, -, 0.16] renormalised.
    np.testing.assert_allclose(probs(out)[[0, 1, 3]], np.array([0.16, 0.24, 0.16]) / 0.56, atol=1e-15)


@pytest.mark.parametrize("weight", [1.0, -0.5])
@pytest.mark.parametrize("where", ["tuned", "reference"])
def test_neg_inf_in_one_model_rules_the_token_out_for_any_sign(where, weight):
    # With a negative weight, -inf in tuned (or in the reference with a positive one) would become +inf.
    tuned, ref = LT.copy(), LR.copy()
    (tuned if where == "tuned" else ref)[1] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = eft_logprobs(LB, [(tuned, ref, weight)], 4)
    assert out[1] == -np.inf
    assert np.isfinite(out[[0, 2, 3]]).all()
    assert math.isclose(probs(out).sum(), 1.0, abs_tol=1e-12)


def test_neg_inf_in_base_stays_neg_inf():
    base = LB.copy()
    base[3] = -np.inf
    tuned = LT.copy()
    tuned[3] = 40.0  # a huge boost cannot bring the token back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = eft_logprobs(base, [(tuned, LR, 2.0)], 4)
    assert out[3] == -np.inf
    assert not np.isnan(out).any()


def test_multiple_deltas_add_up():
    t2 = np.log([0.4, 0.3, 0.2, 0.1])
    r2 = np.log([0.1, 0.2, 0.3, 0.4])
    out = eft_logprobs(LB, [(LT, LR, 1.5), (t2, r2, 0.5)], 4)
    expected = log_softmax(LB + 1.5 * (LT - LR) + 0.5 * (t2 - r2))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-13)
    # One delta twice at weight 1 is the same delta once at weight 2.
    np.testing.assert_allclose(
        eft_logprobs(LB, [(LT, LR, 1.0), (LT, LR, 1.0)], 4),
        [math.log(v) for v in (0.08, 0.24, 0.36, 0.32)],
        rtol=0, atol=1e-14,
    )


def _log_softmax_f32(x: np.ndarray) -> np.ndarray:
    s = x - x.max()
    return s - np.log(np.sum(np.exp(s)))


def test_float32_inputs_keep_distinct_values_distinct():
    # Ids 1 and 2 differ by one float32 ulp at 1.0, but sit ~1e4 below the max, where the float32
    # ulp is ~1e-3: a float32 log-softmax rounds them to the same value.
    one = np.float32(1.0)
    base = np.array([1e4, one, np.nextafter(one, np.float32(2))], dtype=np.float32)
    naive = _log_softmax_f32(base)
    assert naive.dtype == np.float32 and naive[1] == naive[2]  # the hazard is real

    ls = log_softmax(base)
    assert ls[2] > ls[1]

    # The tuned model rules out id 0, so the argmax is decided between the two near-ties.
    tuned = np.array([-np.inf, 0.0, 0.0], dtype=np.float32)
    ref = np.zeros(3, dtype=np.float32)
    naive_eft = _log_softmax_f32(naive + (_log_softmax_f32(tuned) - _log_softmax_f32(ref)))
    assert naive_eft[1] == naive_eft[2]
    out = eft_logprobs(base, [(tuned, ref, 1.0)], 3)
    assert out.dtype == np.float64
    assert out[2] > out[1]
    assert int(np.argmax(out)) == 2


# -- rows of many sequences at once (the batched engine) ------------------------------------------


def test_rows_combine_exactly_as_each_row_alone():
    """2-D rows with per-row weights give, bit for bit, what each row gives alone, -inf included."""
    rng = np.random.default_rng(0)
    n_rows, n_vocab, n_shared = 5, 300, 290
    base, t1, r1, t2, r2 = (rng.normal(size=(n_rows, n_vocab)) * 4 for _ in range(5))
    r1[1, 7] = -np.inf  # ruled out by a reference in one row
    t2[3, 11] = -np.inf
    w1 = np.array([1.0, 0.5, 0.0, 2.0, -1.0])
    w2 = np.array([0.0, 0.3, 1.0, 1.0, 0.0])
    rows = eft_logprobs(log_softmax(base), [(log_softmax(t1), log_softmax(r1), w1),
                                            (log_softmax(t2), log_softmax(r2), w2)], n_shared)
    assert rows.shape == (n_rows, n_shared)
    for i in range(n_rows):
        alone = eft_logprobs(log_softmax(base[i]), [(log_softmax(t1[i]), log_softmax(r1[i]), w1[i]),
                                                    (log_softmax(t2[i]), log_softmax(r2[i]), w2[i])], n_shared)
        np.testing.assert_array_equal(rows[i], alone)
    assert rows[1, 7] == -np.inf and rows[3, 11] == -np.inf
    # Weight 0 in that row: the ruled-out token of the second delta does not count there.
    assert np.isfinite(rows[0, 11]) and rows[4, 11] > -np.inf


def test_log_softmax_rows_need_a_finite_maximum_each():
    x = np.zeros((2, 3))
    x[1] = -np.inf
    with pytest.raises(ValueError, match="finite maximum"):
        log_softmax(x)
