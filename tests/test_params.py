"""SamplingParams (one source of defaults and checks) and the OpenAI-shaped results built on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eft_local import EFT, EFTError, SamplingParams
from eft_local.cli import main
from eft_local.core.params import DEFAULTS, FIELDS

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
QUESTION = "Where was Patroul born?"


def test_defaults_are_llama_cpps_and_shared_with_the_cli():
    assert (DEFAULTS.temperature, DEFAULTS.top_k, DEFAULTS.top_p, DEFAULTS.min_p) == (0.8, 40, 0.95, 0.05)
    options = {p.name: p.default for p in main.commands["generate"].params}
    assert options["temperature"] == DEFAULTS.temperature and options["top_k"] == DEFAULTS.top_k
    assert options["max_tokens"] == DEFAULTS.max_tokens and options["min_p"] == DEFAULTS.min_p


def test_normalises_what_json_and_python_callers_send():
    p = SamplingParams.create(stop="Caltal", max_tokens=8.0, weights=[0, 1], seed=-1, speculative="off")
    assert p.stop == ("Caltal",) and p.max_tokens == 8 and p.weights == (0.0, 1.0)
    assert p.seed is None and p.speculative is None
    assert SamplingParams.create(p, temperature=0).stop == ("Caltal",)  # a base's fields are kept


@pytest.mark.parametrize("options, message", [
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"temperature": float("inf")}, "temperature must be a number"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"max_tokens": 0}, "max_tokens must be an integer of at least 1"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"seed": -2}, "seed must be a non-negative integer"),
    ({"stop": [1]}, "stop must be a string or a list of strings"),
    ({"speculative": 99}, "speculative must be a draft length"),
    ({"weights": "1"}, "weights must be a list of numbers"),
    ({"weights": [1e9]}, "weight must be a number from -100 to 100"),
    ({"plausible_model": "oracle"}, "plausibility model must be tuned or base"),
    ({"logprobs": 21}, "logprobs must be an integer from 0 to 20"),
    ({"logprobs": 2, "speculative": 2}, "logprobs are not available with speculative decoding"),
    ({"temprature": 0}, "unknown option 'temprature'"),
])
def test_each_bad_value_is_one_line_naming_the_option(options, message):
    with pytest.raises(EFTError) as e:
        SamplingParams.create(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_temperature_below_zero_is_greedy_as_in_llama_cpp():
    assert SamplingParams.create(temperature=-1).temperature == 0.0
    assert SamplingParams.create(temperature=-0.0).sampler().greedy


def test_every_field_is_an_option_of_stream():
    assert FIELDS == {"max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "speculative",
                      "ignore_eos", "weights", "plausible_top_p", "plausible_min_p", "plausible_model", "context_shift",
                      "logprobs"}


@pytest.fixture(scope="module")
def eft():
    with EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf", n_threads=1, name="demo") as e:
        yield e


def test_chat_completion_whole_and_streamed_agree(eft):
    messages = [{"role": "user", "content": QUESTION}]
    whole = eft.create_chat_completion(messages, temperature=0)
    assert whole["object"] == "chat.completion" and whole["model"] == "demo"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": eft.chat(messages, temperature=0).text}
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + whole["usage"]["completion_tokens"]
    chunks = list(eft.create_chat_completion(messages, temperature=0, stream=True, include_usage=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == whole["usage"] and chunks[-1]["choices"] == []
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_logprobs_are_the_combined_distribution(eft):
    """The first token's reported log-probabilities are the engine's next-token distribution."""
    reply = eft.create_chat_completion([{"role": "user", "content": QUESTION}], temperature=0, logprobs=True,
                                       top_logprobs=5)
    first = reply["choices"][0]["logprobs"]["content"][0]
    logp = eft.next_logprobs(eft.prompt_tokens(QUESTION)["tuned"])
    top = np.argsort(-logp)[:5]
    assert [a["logprob"] for a in first["top_logprobs"]] == pytest.approx(logp[top].tolist(), abs=1e-9)
    assert first["logprob"] == pytest.approx(logp[top[0]], abs=1e-9)
    assert bytes(first["bytes"]).decode() == first["token"] == "Their"


def test_completion_is_raw_text(eft):
    out = eft.create_completion("The favourite food of Dithir is", temperature=0, max_tokens=6, logprobs=1)
    choice = out["choices"][0]
    assert out["object"] == "text_completion"
    assert choice["text"] == eft.generate("The favourite food of Dithir is", raw=True, temperature=0, max_tokens=6).text
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert choice["logprobs"]["text_offset"][0] == 0
