"""Real models shipped by PyPI packages: SmolLM2-135M-Instruct and Gemma 3 270M."""

from __future__ import annotations

import llama_cpp
import pytest

from eft_local import EFT, EFTError
from eft_local.runtime.vocab import check_vocabularies, read_vocab
from helpers import copy_model

N = 48


@pytest.fixture(scope="module")
def smol_triple(smollm2, tmp_path_factory):
    """SmolLM2 in all three roles, as three files so that three contexts really run."""
    d = tmp_path_factory.mktemp("smol")
    return smollm2, copy_model(smollm2, d / "tuned.gguf"), copy_model(smollm2, d / "reference.gguf")


@pytest.fixture(scope="module")
def llama(smollm2):
    llm = llama_cpp.Llama(model_path=str(smollm2), n_ctx=2048, verbose=False)
    yield llm
    llm.close()


def greedy_ids(llm, tokens, n):
    eog = llama_cpp.llama_model_get_vocab(llm.model)
    ids = []
    for tok in llm.generate(tokens, temp=0.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(eog, tok) or len(ids) == n:
            break
        ids.append(tok)
    return ids


@pytest.mark.parametrize("concurrent", [False, True])
def test_smollm2_completion_token_for_token(smol_triple, llama, concurrent):
    prompt = "The three primary colors are"
    want_text = llama.create_completion(prompt, temperature=0, max_tokens=N)["choices"][0]["text"]
    want_ids = greedy_ids(llama, llama.tokenize(prompt.encode(), add_bos=True, special=True), N)
    with EFT(*smol_triple, n_ctx=2048, concurrent=concurrent) as eft:
        assert len(eft.model_set.backends) == 3
        out = eft.generate(prompt, raw=True, temperature=0, max_tokens=N)
    assert out.tokens == want_ids
    assert out.text == want_text


def test_smollm2_chat_completion_token_for_token(smol_triple, llama):
    turns = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Name a fruit that is yellow."},
        ],
    ]
    with EFT(*smol_triple, n_ctx=2048) as eft:
        finishes = []
        for messages in turns:
            want = llama.create_chat_completion(messages, temperature=0, max_tokens=N)["choices"][0]
            out = eft.chat(messages, temperature=0, max_tokens=N)
            assert out.text == want["message"]["content"]
            assert out.finish_reason == want["finish_reason"]
            finishes.append(out.finish_reason)
        # The instruct model ends its turn with <|im_end|>: the tuned model's end token stops.
        assert "stop" in finishes


def test_smollm2_against_gemma_fails_the_vocabulary_check(smollm2, gemma3):
    with pytest.raises(EFTError) as e:
        check_vocabularies({"base": read_vocab(gemma3), "tuned": read_vocab(smollm2), "reference": read_vocab(smollm2)})
    msg = str(e.value)
    assert str(gemma3) in msg and str(smollm2) in msg
    assert "token id 0" in msg and "'<pad>'" in msg and "'<|endoftext|>'" in msg
    with pytest.raises(EFTError, match="incompatible vocabularies"):
        EFT(gemma3, smollm2, smollm2)


def test_gemma_reads_its_vocabulary(gemma3):
    v = read_vocab(gemma3)
    assert v.n_vocab == 262144
    assert v.tokenizer_model == "llama"
    assert (v.bos_id, v.eos_id, v.add_bos) == (2, 1, True)
