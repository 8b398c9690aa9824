"""Per-token explanation: the terms add up, and match the engine's own distribution."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from eft_local import EFT, EFTError
from eft_local.cli import main
from helpers import Fresh
from tiny_gguf import write_tiny_llama


@pytest.fixture(scope="module")
def eft(tiny, tmp_path_factory):
    tuned2 = write_tiny_llama(tmp_path_factory.mktemp("explain") / "tuned2.gguf", seed=7)
    deltas = [(tiny["tuned"], tiny["reference"], 1.0), (tuned2, tiny["reference"], 0.5)]
    with EFT(tiny["base"], deltas=deltas) as e:
        yield e


def test_terms_add_up_and_match_the_engine(eft, tiny):
    rows = eft.explain("Hello world", temperature=0, max_tokens=12)
    assert len(rows) >= 10
    prompt = eft.prompt_tokens("Hello world")["tuned"]
    reply = [r.token for r in rows]
    fresh_base = Fresh(tiny["base"])
    try:
        for i, r in enumerate(rows):
            assert len(r.delta_terms) == 2
            total = r.logprobs["base"] + sum(r.delta_terms) - r.log_normalizer
            assert total == pytest.approx(r.combined_logprob, abs=1e-9)
            assert r.combined_prob == pytest.approx(np.exp(r.combined_logprob))
            # The explanation's combined distribution is the one the engine samples from.
            engine = eft.next_logprobs(prompt + reply[:i])
            assert r.combined_logprob == pytest.approx(engine[r.token], abs=1e-3)
            # Greedy: every token is the combined argmax.
            assert engine[r.token] >= engine.max() - 1e-3
            base_logits = fresh_base.logits(prompt + reply[:i])[: eft.model_set.n_shared]
            assert r.base_top == int(np.argmax(base_logits))
            assert r.base_would_differ == (r.base_top != r.token)
            assert r.delta_terms[1] == pytest.approx(0.5 * (r.logprobs["tuned2"] - r.logprobs["reference2"]))
    finally:
        fresh_base.close()
    assert any(r.base_would_differ for r in rows)


def test_scoring_a_given_reply(eft):
    """A given reply is tokenized as the continuation of the rendered prompt, as generated
    tokens are: no leading space (which tokenizing it alone would add)."""
    rows = eft.explain("Hello world", reply="the cat is here")
    prompt = eft.prompt_tokens("Hello world")["tuned"]
    rendered = "<s><|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    full = eft.model_set.by_role["tuned"].tokenize(rendered + "the cat is here", add_bos=False, special=True)
    assert full[: len(prompt)] == prompt
    assert [r.token for r in rows] == full[len(prompt):]
    assert [r.token for r in rows] != eft.model_set.by_role["tuned"].tokenize("the cat is here", add_bos=False, special=False)
    assert "".join(r.text for r in rows) == "the cat is here"
    assert all(r.combined_logprob <= 0 for r in rows)
    with pytest.raises(EFTError, match="empty"):
        eft.explain("Hello world", reply="")


def test_explain_command(tiny):
    models = ["-m", str(tiny["base"]), "--tuned", str(tiny["tuned"]), "--reference", str(tiny["reference"])]
    out = CliRunner().invoke(main, ["explain", "Hello world", *models, "--temperature", "0", "-n", "6", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert len(rows) == 6
    assert {"token", "text", "logprobs", "delta_terms", "combined_prob", "base_would_differ"} <= set(rows[0])
    table = CliRunner().invoke(main, ["explain", "Hello world", *models, "--reply", "the cat"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["token", "base", "tuned", "reference"]
    assert len(lines) == 1 + len(json.loads(CliRunner().invoke(
        main, ["explain", "Hello world", *models, "--reply", "the cat", "--json"]).stdout))
