"""The engine on tiny generated GGUF models: exactness against fresh evaluations, KV reuse,
identities, sampling statistics, stops, prompts."""

from __future__ import annotations

import math

import llama_cpp
import numpy as np
import pytest

from eft_local import EFT, EFTError, Sampler
from helpers import Fresh, copy_model, recompute

ROLES = ("base", "tuned", "reference")
PROMPTS = ["Hello world", "The capital of France is", "a cat and a dog", "what is the answer"]


@pytest.fixture(scope="module")
def eft(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_ctx=1024) as e:
        yield e


@pytest.fixture(scope="module")
def fresh(tiny):
    models = {role: Fresh(tiny[role]) for role in ROLES}
    yield models
    for m in models.values():
        m.close()


def same(tokens):
    return {role: tokens for role in ROLES}


def test_three_distinct_models_loaded(eft):
    assert len(eft.model_set.backends) == 3
    assert eft.model_set.n_shared == eft.model_set.by_role["base"].n_vocab


@pytest.mark.parametrize("weight", [1.0, 0.5, 2.0])
def test_next_logprobs_match_fresh_evaluation(eft, fresh, weight):
    eft.weight = weight
    try:
        for text in PROMPTS:
            tokens = eft.prompt_tokens(text, raw=True)["tuned"]
            got = eft.next_logprobs(tokens)
            want = recompute(fresh, same(tokens), weight, eft.model_set.n_shared)
            assert got.shape == want.shape
            assert np.abs(np.exp(got).sum() - 1) < 1e-9
            np.testing.assert_allclose(got, want, atol=1e-3)
            # Not trivially close: the delta really moves the base distribution.
            base_only = recompute(fresh, same(tokens), 0.0, eft.model_set.n_shared)
            assert np.abs(want - base_only).max() > 0.1
    finally:
        eft.weight = 1.0


def assert_greedy_path(fresh, prompts_by_role, generated, weight, n_shared):
    """Every greedy token is the argmax of the recomputed EFT distribution at that step."""
    for i, token in enumerate(generated):
        ctx = {role: p + generated[:i] for role, p in prompts_by_role.items()}
        want = recompute(fresh, ctx, weight, n_shared)
        # Ties within llama.cpp's batch/step numerics are not a disagreement.
        assert want[token] >= want.max() - 1e-3, f"step {i}: token {token} is not the argmax {want.argmax()}"


def test_greedy_path_follows_argmax_across_two_chat_turns(tiny, fresh):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_ctx=1024) as eft:
        messages = [{"role": "user", "content": "Hello world"}]
        first = eft.chat(messages, temperature=0, max_tokens=32)
        assert first.stats["completion_tokens"] >= 30 or first.finish_reason == "stop"
        assert_greedy_path(fresh, same(eft.prompt_tokens(messages=messages)["tuned"]), first.tokens, 1.0, eft.model_set.n_shared)

        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "what is the answer"}]
        evaluated = eft.model_set.by_role["base"].n_evaluated
        second = eft.chat(messages, temperature=0, max_tokens=32)
        prompt = eft.prompt_tokens(messages=messages)["tuned"]
        # The second turn reuses the cached conversation: only the new tail is evaluated.
        assert second.stats["prompt_tokens"] == len(prompt)
        assert second.stats["prompt_eval_tokens"] < len(prompt) / 2
        assert eft.model_set.by_role["base"].n_evaluated - evaluated < len(prompt) / 2 + len(second.tokens)
        assert_greedy_path(fresh, same(prompt), second.tokens, 1.0, eft.model_set.n_shared)


def test_repeated_prompt_evaluates_one_token(eft):
    tokens = eft.prompt_tokens("The capital of France is", raw=True)["tuned"]
    first = eft.next_logprobs(tokens).copy()
    before = [b.n_evaluated for b in eft.model_set.backends]
    again = eft.next_logprobs(tokens)
    assert [b.n_evaluated - n for b, n in zip(eft.model_set.backends, before)] == [1, 1, 1]
    np.testing.assert_allclose(again, first, atol=1e-4)


def llama_greedy(path, prompt, n):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, verbose=False)
    try:
        out = llm.create_completion(prompt, temperature=0, max_tokens=n)
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        ids = []
        for tok in llm.generate(tokens, temp=0.0, reset=True):
            if llm.token_eos() == tok or llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), tok):
                break
            ids.append(tok)
            if len(ids) == n:
                break
        return out["choices"][0]["text"], ids
    finally:
        llm.close()


@pytest.mark.parametrize("prompt", ["Hello world", "a cat and a dog"])
def test_tuned_equal_reference_is_the_base_model(tiny, tmp_path, prompt):
    text, ids = llama_greedy(tiny["base"], prompt, 30)
    assert len(ids) >= 10
    reference = copy_model(tiny["tuned"], tmp_path / "reference-copy.gguf")
    with EFT(tiny["base"], tiny["tuned"], reference) as eft:
        assert len(eft.model_set.backends) == 3
        out = eft.generate(prompt, raw=True, temperature=0, max_tokens=30)
    assert out.tokens == ids
    assert out.text == text


def test_weight_zero_is_the_base_model(tiny):
    text, ids = llama_greedy(tiny["base"], "Hello world", 30)
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], weight=0.0) as eft:
        out = eft.generate("Hello world", raw=True, temperature=0, max_tokens=30)
    assert out.tokens == ids
    assert out.text == text


def test_shared_file_is_loaded_once(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["tuned"]) as eft:
        assert len(eft.model_set.backends) == 2
        assert eft.model_set.by_role["tuned"] is eft.model_set.by_role["reference"]
        lp = eft.next_logprobs(eft.prompt_tokens("Hello world", raw=True)["tuned"])
        base = eft.model_set.by_role["base"]
        want = base.logits().astype(np.float64)
        want = want - want.max() - np.log(np.exp(want - want.max()).sum())
        np.testing.assert_allclose(lp, want, atol=1e-9)


def chi_square_critical(dof: int, alpha_z: float = 3.719) -> float:
    """Upper critical value of chi-square (Wilson-Hilferty); z=3.719 is a 1e-4 tail."""
    return dof * (1 - 2 / (9 * dof) + alpha_z * math.sqrt(2 / (9 * dof))) ** 3


def test_sampled_tokens_follow_the_combined_distribution(eft):
    tokens = eft.prompt_tokens("Hello world", raw=True)["tuned"]
    p = np.exp(eft.next_logprobs(tokens))
    n = 1500
    counts = np.zeros_like(p)
    for seed in range(n):
        out = eft.generate("Hello world", raw=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=1, seed=seed)
        counts[out.tokens[0] if out.tokens else eft.model_set.by_role["tuned"].eos_id] += 1
    expected = p * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    assert dof >= 5
    assert stat < chi_square_critical(dof)
    # The test can fail: the base model's own distribution is rejected.
    base = eft.model_set.by_role["base"]
    eft.next_logprobs(tokens)
    q = np.exp(base.logits().astype(np.float64) - base.logits().max())
    q /= q.sum()
    exp_q = np.append((q * n)[big], (q * n)[~big].sum())
    assert ((obs - exp_q) ** 2 / exp_q).sum() > chi_square_critical(dof)


def test_same_seed_same_output(eft):
    runs = [eft.generate("Hello world", temperature=1.0, max_tokens=20, seed=s).tokens for s in (7, 7, 8, 9)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs}) >= 2


def test_top_k_one_is_greedy(eft):
    greedy = eft.generate("Hello world", temperature=0, max_tokens=15).tokens
    top1 = eft.generate("Hello world", temperature=1.5, top_k=1, max_tokens=15, seed=3).tokens
    assert top1 == greedy


def test_stop_string_never_leaks(eft):
    full = eft.generate("Hello world", temperature=0, max_tokens=30)
    assert len(full.text) > 10
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    out = eft.generate("Hello world", temperature=0, max_tokens=30, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert stop not in out.text
    streamed = "".join(c.text for c in eft.stream("Hello world", temperature=0, max_tokens=30, stop=[stop]))
    assert streamed == out.text


def test_max_tokens_gives_length(eft):
    out = eft.generate("Hello world", temperature=0, max_tokens=5)
    assert out.finish_reason == "length"
    assert len(out.tokens) == 5
    assert out.stats["completion_tokens"] == 5


def test_end_of_generation_token_stops(eft, monkeypatch):
    """The tuned model's end tokens end the reply and are not part of it."""
    from tiny_gguf import IM_END_ID

    greedy = eft.generate("Hello world", temperature=0, max_tokens=10)
    real_sample = Sampler.sample
    calls = []

    def sample_then_end(self, logp, rng):
        calls.append(1)
        return IM_END_ID if len(calls) == 5 else real_sample(self, logp, rng)

    monkeypatch.setattr(Sampler, "sample", sample_then_end)
    out = eft.generate("Hello world", temperature=0, max_tokens=10)
    assert out.finish_reason == "stop"
    assert out.tokens == greedy.tokens[:4]
    assert eft.model_set.by_role["tuned"].is_eog(IM_END_ID)


def test_concurrent_equals_sequential(tiny):
    outs = []
    for concurrent in (False, True):
        with EFT(tiny["base"], tiny["tuned"], tiny["reference"], concurrent=concurrent) as eft:
            assert (eft.model_set._pool is not None) == concurrent
            outs.append(eft.generate("a cat and a dog", temperature=0, max_tokens=25).tokens)
    assert outs[0] == outs[1]


def test_plain_base_prompt(tiny, fresh):
    messages = [{"role": "user", "content": "Hello world"}]
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], base_prompt="plain") as eft:
        prompts = eft.prompt_tokens(messages=messages)
        assert prompts["base"] == prompts["reference"] != prompts["tuned"]
        assert prompts["tuned"][1] == 3  # <|im_start|>: the chat template
        assert 3 not in prompts["base"]
        out = eft.chat(messages, temperature=0, max_tokens=12)
        assert_greedy_path(fresh, prompts, out.tokens, 1.0, eft.model_set.n_shared)


def test_padded_base_combines_over_shared_range(tiny):
    with EFT(tiny["padded"], tiny["tuned"], tiny["reference"]) as eft:
        assert eft.model_set.by_role["base"].n_vocab == eft.model_set.n_shared + 64
        lp = eft.next_logprobs(eft.prompt_tokens("Hello world", raw=True)["tuned"])
        assert lp.shape == (eft.model_set.n_shared,)
        assert abs(np.exp(lp).sum() - 1) < 1e-9
        out = eft.generate("Hello world", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=20, seed=1)
        assert all(t < eft.model_set.n_shared for t in out.tokens)


def test_incompatible_vocabulary_fails_before_loading(tiny):
    with pytest.raises(EFTError) as e:
        EFT(tiny["base"], tiny["alt"], tiny["reference"])
    msg = str(e.value)
    assert str(tiny["base"]) in msg and str(tiny["alt"]) in msg
    assert "\n" not in msg


def test_prompt_longer_than_context(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_ctx=256) as eft:
        with pytest.raises(EFTError, match="context"):
            eft.generate("the " * 400, raw=True, max_tokens=4)
        # The engine is still usable afterwards.
        assert eft.generate("Hello world", temperature=0, max_tokens=3).tokens


def test_generation_stops_at_context_end(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_ctx=256) as eft:
        n_ctx = eft.model_set.n_ctx
        prompt = eft.prompt_tokens("Hello world", raw=True)["tuned"]
        out = eft.generate("Hello world", raw=True, temperature=0, max_tokens=10_000)
        assert out.finish_reason in ("length", "stop")
        assert len(prompt) + len(out.tokens) <= n_ctx + 1


def test_streamed_text_is_whole_characters(eft):
    chunks = list(eft.stream("Hello world", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=40, seed=11))
    text = "".join(c.text for c in chunks)
    for c in chunks:
        c.text.encode("utf-8")  # raises on a lone surrogate
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].stats["completion_tokens"] == sum(1 for c in chunks if c.token is not None)
    assert text == eft.generate("Hello world", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=40, seed=11).text


def test_bad_token_ids_and_messages(eft):
    with pytest.raises(EFTError, match="outside the shared vocabulary"):
        eft.next_logprobs([1, eft.model_set.n_shared + 5])
    with pytest.raises(EFTError):
        eft.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(EFTError):
        eft.chat([])


def test_weight_zero_runs_only_the_base_and_the_others_catch_up(tiny):
    """At weight 0 the tuned and reference models are not evaluated; when the weight becomes
    non-zero again (chat's /weight) they catch up on the whole conversation, and the reply is
    what a fresh EFT gives for it."""
    chat = [{"role": "user", "content": "Hello world"}]
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_ctx=1024) as e, \
            EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_ctx=1024) as ref:
        counts = {role: e.model_set.by_role[role].n_evaluated for role in ROLES}
        zero = e.chat(chat, temperature=0, max_tokens=12, weights=[0.0])
        after = {role: e.model_set.by_role[role].n_evaluated for role in ROLES}
        assert after["base"] > counts["base"]
        assert after["tuned"] == counts["tuned"] and after["reference"] == counts["reference"]
        assert zero.stats["prompt_eval_tokens"] > 0
        # The base alone, greedy: each token is the base's argmax after the tokens before it.
        prompt = e.prompt_tokens(messages=chat)["base"]
        for i, token in enumerate(zero.tokens):
            assert token == int(np.argmax(e.next_logprobs(prompt + zero.tokens[:i], weights=[0.0])))

        turn2 = chat + [{"role": "assistant", "content": zero.text}, {"role": "user", "content": "and then?"}]
        got = e.chat(turn2, temperature=0, max_tokens=12, weights=[1.0])
        want = ref.chat(turn2, temperature=0, max_tokens=12, weights=[1.0])
        assert got.tokens == want.tokens
        assert e.model_set.by_role["tuned"].n_evaluated > after["tuned"]
        # Not trivially equal: the delta changes this reply.
        assert got.tokens != ref.chat(turn2, temperature=0, max_tokens=12, weights=[0.0]).tokens
