"""Speculative EFT decoding: exact greedy identity, the same sampled distribution, rollback."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from eft_local import EFT, EFTError, Sampler
from eft_local.runtime import context as backend_module
from eft_local.engine.speculative import DraftTuner, residual
from helpers import copy_model

PROMPTS = ["Hello world", "a cat and a dog", "what is the answer"]


@pytest.fixture(scope="module")
def eft(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_threads=1) as e:
        yield e


def test_residual_is_normalised_positive_part():
    p = np.log(np.array([0.5, 0.3, 0.2, 0.0]) + 1e-300)
    q = np.log(np.array([0.2, 0.5, 0.2, 0.1]))
    r = np.exp(residual(p, q))
    np.testing.assert_allclose(r, [1.0, 0.0, 0.0, 0.0], atol=1e-12)
    p2 = np.log(np.array([0.4, 0.4, 0.2]))
    q2 = np.log(np.array([0.1, 0.3, 0.6]))
    np.testing.assert_allclose(np.exp(residual(p2, q2)), [0.3 / 0.4, 0.1 / 0.4, 0.0], atol=1e-12)
    # p == q: no residual mass; fall back to p rather than NaN.
    np.testing.assert_allclose(residual(p2, p2), p2)


def test_draft_tuner_settles_on_the_cheapest_length():
    """Simulated costs: a round of k takes 1 + 0.5 k and emits k + 1 tokens (cheapest per token at
    large k), or emits only 2 tokens past k = 3 (cheapest at k = 3)."""
    for emitted, best in ((lambda k: k + 1, 16), (lambda k: min(k, 3) + 1, 3)):
        tuner = DraftTuner(4)
        for _ in range(60):
            k = tuner.k
            tuner.update(1 + 0.5 * k, emitted(k))
        assert tuner.k == best


@pytest.mark.parametrize("k", [1, 2, 4, 6, "auto"])
def test_greedy_is_token_identical(eft, k):
    for prompt in PROMPTS:
        plain = eft.generate(prompt, temperature=0, max_tokens=40)
        spec = eft.generate(prompt, temperature=0, max_tokens=40, speculative=k)
        assert spec.tokens == plain.tokens
        assert spec.text == plain.text
        assert spec.finish_reason == plain.finish_reason
        assert spec.stats["rounds"] + spec.stats["plain_steps"] > 0
        assert 0 <= spec.stats["accepted"] <= spec.stats["drafted"]


def test_greedy_identity_across_chat_turns_and_plain_prompts(tiny):
    messages = [{"role": "user", "content": "Hello world"}]
    for base_prompt in ("same", "plain"):
        outs = []
        for speculative in (None, 3):
            with EFT(tiny["base"], tiny["tuned"], tiny["reference"], base_prompt=base_prompt, n_threads=1) as eft:
                first = eft.chat(messages, temperature=0, max_tokens=20, speculative=speculative)
                turn2 = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "a cat"}]
                second = eft.chat(turn2, temperature=0, max_tokens=20, speculative=speculative)
                assert second.stats["prompt_eval_tokens"] < second.stats["prompt_tokens"]
                outs.append((first.tokens, second.tokens))
        assert outs[0] == outs[1]


def test_full_acceptance_when_the_target_is_the_draft(tiny, tmp_path):
    """base = reference = tuned's weights: EFT equals the tuned model, so every draft is accepted."""
    base = copy_model(tiny["tuned"], tmp_path / "base.gguf")
    reference = copy_model(tiny["tuned"], tmp_path / "reference.gguf")
    with EFT(base, tiny["tuned"], reference, n_threads=1) as eft:
        assert len(eft.model_set.backends) == 3
        greedy = eft.generate("Hello world", temperature=0, max_tokens=30, speculative=4)
        assert greedy.stats["acceptance_rate"] == 1.0
        sampled = eft.generate("Hello world", temperature=1.0, max_tokens=30, speculative=4, seed=5)
        assert sampled.stats["acceptance_rate"] > 0.99


def test_rollback_when_the_cache_cannot_drop_a_tail(eft, monkeypatch):
    """Caches that refuse partial removal are rebuilt; the output does not change."""
    want = eft.generate("a cat and a dog", temperature=0, max_tokens=25, speculative=4).tokens
    monkeypatch.setattr(backend_module.llama_cpp, "llama_memory_seq_rm", lambda *a: False)
    got = eft.generate("a cat and a dog", temperature=0, max_tokens=25, speculative=4)
    assert got.tokens == want


def chi_square_ok(counts: Counter, probs: dict, n: int) -> tuple[float, float]:
    """(statistic, 1e-4 critical value) with cells of expected count < 5 pooled."""
    big = {key: p * n for key, p in probs.items() if p * n >= 5}
    obs = [counts.get(key, 0) for key in big] + [n - sum(counts.get(key, 0) for key in big)]
    exp = list(big.values()) + [n - sum(big.values())]
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(exp) - 1
    z = 3.719
    return stat, dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_sampled_distribution_matches_plain_eft(eft):
    """Next-token and two-token frequencies of speculative sampling match the exact EFT distribution."""
    sampler = Sampler(temperature=0.9, top_k=12, top_p=1.0, min_p=0.0)
    prompt = eft.prompt_tokens("Hello world", raw=True)["tuned"]
    p1 = np.exp(sampler.distribution(eft.next_logprobs(prompt)))
    first = {int(t): float(p1[t]) for t in np.flatnonzero(p1 > 0)}
    joint = {}
    for t, pt in first.items():
        p2 = np.exp(sampler.distribution(eft.next_logprobs(prompt + [t])))
        for u in np.flatnonzero(p2 > 0):
            joint[(t, int(u))] = pt * float(p2[u])

    n = 2500
    firsts, pairs = Counter(), Counter()
    for seed in range(n):
        out = eft.generate("Hello world", raw=True, max_tokens=2, temperature=0.9, top_k=12, top_p=1.0,
                           min_p=0.0, seed=seed, speculative=2)
        assert len(out.tokens) == 2, "no end token in this tiny vocabulary's top 12 here"
        firsts[out.tokens[0]] += 1
        pairs[tuple(out.tokens)] += 1
    for counts, probs in ((firsts, first), (pairs, joint)):
        stat, critical = chi_square_ok(counts, probs, n)
        assert stat < critical
    # The test has power: the tuned model's own draft distribution is rejected.
    eft.next_logprobs(prompt)
    q = np.exp(sampler.distribution(eft.model_set.by_role["tuned"].logits().astype(np.float64)[: eft.model_set.n_shared]))
    q /= q.sum()
    stat, critical = chi_square_ok(firsts, {int(t): float(q[t]) for t in np.flatnonzero(q > 0)}, n)
    assert stat > critical


def test_stops_at_context_end(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_ctx=256, n_threads=1) as eft:
        n_ctx = eft.model_set.n_ctx
        out = eft.generate("Hello world", raw=True, temperature=0, max_tokens=10_000, speculative=6)
        plain = eft.generate("Hello world", raw=True, temperature=0, max_tokens=10_000)
        assert out.finish_reason == plain.finish_reason
        assert len(out.tokens) + out.stats["prompt_tokens"] <= n_ctx + 1
        # Speculative rounds leave room for a full draft, so they may end a few tokens earlier.
        assert out.tokens == plain.tokens[: len(out.tokens)]


def test_stats_and_validation(eft):
    out = eft.generate("Hello world", temperature=0, max_tokens=10, speculative="auto")
    for key in ("acceptance_rate", "accepted_per_round", "drafted", "accepted", "rounds",
                "draft_seconds", "verify_seconds", "combine_sample_seconds"):
        assert key in out.stats
    # "auto" measured plain steps (k = 0) and drafts, and keeps what it learnt for the next call.
    tuner = eft.model_set.draft_tuner
    assert {0, 4} <= set(tuner.cost) and "plain_steps" in out.stats
    again = eft.generate("Hello world", temperature=0, max_tokens=10, speculative="auto")
    assert eft.model_set.draft_tuner is tuner and again.tokens == out.tokens
    plain = eft.generate("Hello world", temperature=0, max_tokens=10, speculative=0)
    assert "rounds" not in plain.stats and "forward_seconds" in plain.stats
    for bad in (17, -1, "fast", 2.5):
        with pytest.raises(EFTError, match="speculative"):
            eft.generate("Hello world", max_tokens=3, speculative=bad)


@pytest.mark.parametrize("speculative", [None, 3])
def test_ignore_eos_always_reaches_max_tokens(eft, speculative):
    ends = set(eft.model_set.end_tokens())
    assert ends == {2, 4}  # </s> and <|im_end|> in the tiny vocabulary
    for seed in range(3):
        out = eft.generate("Hello world", temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=120,
                           seed=seed, ignore_eos=True, speculative=speculative)
        assert len(out.tokens) == 120 and out.finish_reason == "length"
        assert not ends & set(out.tokens)


def test_draft_tuner_turns_speculation_off_when_drafts_do_not_pay():
    """Simulated costs: a plain step takes 1 and emits 1 token; a round of k takes 1 + k and emits
    2 tokens (drafts cost as much as the large model's step and one in k is accepted)."""
    tuner = DraftTuner(4)
    assert tuner.k == 0  # the first round measures plain decoding
    ks = []
    for _ in range(64):
        k = tuner.k
        ks.append(k)
        tuner.update(1.0 if k == 0 else 1 + k, 1 if k == 0 else 2)
    assert ks[1] == 4
    # Settled on plain steps, apart from a re-measure of k = 1 every PROBE rounds.
    assert ks[-20:].count(0) >= 18 and set(ks[-20:]) <= {0, 1}
