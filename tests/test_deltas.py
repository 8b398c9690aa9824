"""Several deltas, shared models, weights that change between calls, and down-scaling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eft_local import EFT, EFTError
from helpers import Fresh
from tiny_gguf import write_tiny_llama


@pytest.fixture(scope="module")
def tuned2(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("delta") / "tuned2.gguf", seed=7)


def log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def recompute(paths, tokens, weights):
    """base + sum w_i (tuned_i - reference_i) from fresh evaluations of every file."""
    rows = {}
    for p in {str(p) for p in [paths["base"], *[q for d in paths["deltas"] for q in d]]}:
        f = Fresh(p)
        rows[p] = log_softmax(f.logits(tokens))
        f.close()
    total = rows[str(paths["base"])].copy()
    for (t, r), w in zip(paths["deltas"], weights):
        total += w * (rows[str(t)] - rows[str(r)])
    return log_softmax(total)


def test_two_deltas_match_fresh_evaluation(tiny, tuned2):
    deltas = [(tiny["tuned"], tiny["reference"], 0.7), (tuned2, tiny["reference"], 0.4)]
    with EFT(tiny["base"], deltas=deltas) as eft:
        assert eft.model_set.roles == ["base", "tuned", "reference", "tuned2", "reference2"]
        # reference is shared by both deltas: four models, not five.
        assert len(eft.model_set.backends) == 4 and eft.model_set.by_role["reference"] is eft.model_set.by_role["reference2"]
        for text in ("Hello world", "a cat and a dog"):
            tokens = eft.prompt_tokens(text, raw=True)["tuned"]
            want = recompute({"base": tiny["base"], "deltas": [d[:2] for d in deltas]}, tokens, [0.7, 0.4])
            np.testing.assert_allclose(eft.next_logprobs(tokens), want, atol=1e-3)
            # The second delta matters: dropping it changes the distribution.
            alone = eft.next_logprobs(tokens, weights=[0.7, 0.0])
            assert np.abs(alone - want).max() > 0.05


def test_shared_model_is_evaluated_once_per_step(tiny, tuned2):
    deltas = [(tiny["tuned"], tiny["reference"]), (tuned2, tiny["reference"])]
    with EFT(tiny["base"], deltas=deltas) as eft:
        ref, base = eft.model_set.by_role["reference"], eft.model_set.by_role["base"]
        out = eft.generate("Hello world", temperature=0, max_tokens=12, ignore_eos=True)
        assert len(out.tokens) == 12
        # One prefill decode and one decode per appended token, for the shared model as for any.
        assert ref.n_decode_calls == base.n_decode_calls == 1 + 11
        assert ref.n_evaluated == base.n_evaluated


def test_weights_change_between_turns_without_reload(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"]) as eft:
        backends = list(eft.model_set.backends)
        messages = [{"role": "user", "content": "Hello world"}]
        first = eft.chat(messages, temperature=0, max_tokens=10)
        eft.weight = 0.0
        base_only = eft.chat(messages, temperature=0, max_tokens=10)
        assert base_only.stats["prompt_eval_tokens"] == 1  # the cache survived the change
        assert eft.model_set.backends == backends
        per_call = eft.chat(messages, temperature=0, max_tokens=10, weights=[1.0])
        assert per_call.tokens == first.tokens and eft.weight == 0.0
        eft.set_weights([1.0])
        assert eft.chat(messages, temperature=0, max_tokens=10).tokens == first.tokens
        assert first.tokens != base_only.tokens
        for bad in ([1.0, 2.0], [float("nan")]):
            with pytest.raises(EFTError):
                eft.set_weights(bad)


def test_down_scaling(tiny):
    """A small base with the larger model's delta: the same flags, roles swapped."""
    small, large = tiny["reference"], tiny["base"]
    with EFT(small, large, tiny["tuned"]) as eft:
        tokens = eft.prompt_tokens("Hello world", raw=True)["tuned"]
        want = recompute({"base": small, "deltas": [(large, tiny["tuned"])]}, tokens, [1.0])
        np.testing.assert_allclose(eft.next_logprobs(tokens), want, atol=1e-3)


def test_delta_errors(tiny):
    with pytest.raises(EFTError, match="tuned and a reference"):
        EFT(tiny["base"])
    with pytest.raises(EFTError, match="delta 2"):
        EFT(tiny["base"], tiny["tuned"], tiny["reference"], deltas=[(tiny["tuned"],)])
    with pytest.raises(EFTError, match="weight"):
        EFT(tiny["base"], deltas=[(tiny["tuned"], tiny["reference"], "heavy")])


def test_cli_delta_option(tiny, tuned2):
    from click.testing import CliRunner

    from eft_local.cli import main

    base = ["-m", str(tiny["base"]), "--temperature", "0", "-n", "8", "--json"]
    one = CliRunner().invoke(main, ["generate", "Hello world", *base, "--tuned", str(tiny["tuned"]), "--reference", str(tiny["reference"])])
    same = CliRunner().invoke(main, ["generate", "Hello world", *base, "--delta", f"{tiny['tuned']}:{tiny['reference']}"])
    assert one.exit_code == same.exit_code == 0, (one.output, same.output)

    def tokens(result):
        return json.loads(result.stdout)["tokens"]

    assert tokens(one) == tokens(same)
    two = CliRunner().invoke(main, ["generate", "Hello world", *base, "--delta", f"{tiny['tuned']}:{tiny['reference']}:1",
                                    "--delta", f"{tuned2}:{tiny['reference']}:3"])
    assert two.exit_code == 0 and tokens(two) != tokens(one)
    check = CliRunner().invoke(main, ["check", "-m", str(tiny["base"]), "-d", f"{tiny['tuned']}:{tiny['reference']}",
                                      "-d", f"{tuned2}:{tiny['alt']}"])
    assert check.exit_code == 1 and str(tiny["alt"]) in check.stderr
    assert "tuned2" in check.stdout
    for bad, code in (("only-one-path", 2), (f"{tiny['tuned']}:{tiny['reference']}:heavy", 2)):
        assert CliRunner().invoke(main, ["generate", "hi", "-m", str(tiny["base"]), "--delta", bad]).exit_code == code
    mixed = CliRunner().invoke(main, ["generate", "hi", "-m", str(tiny["base"]), "--tuned", str(tiny["tuned"]),
                                      "--delta", f"{tiny['tuned']}:{tiny['reference']}"])
    assert mixed.exit_code == 2 and "--delta" in mixed.stderr


def test_chat_weight_commands(tiny, tuned2):
    import io

    from eft_local.cli.chat import chat_loop

    lines = iter(["/weight 0.5", "/delta 2 weight 0.25", "/delta 3 weight 1", "/weight x", "Hello world", "/exit"])
    out = io.StringIO()
    with EFT(tiny["base"], deltas=[(tiny["tuned"], tiny["reference"]), (tuned2, tiny["reference"])]) as eft:
        backends = list(eft.model_set.backends)
        chat_loop(eft, {"temperature": 0, "max_tokens": 5}, read=lambda _: next(lines), out=out)
        assert eft.weights == [0.5, 0.25]
        assert eft.model_set.backends == backends
    text = out.getvalue()
    assert "(delta 1 weight 0.5)" in text and "(delta 2 weight 0.25)" in text
    assert text.count("usage: /weight W") == 2


def test_recipe_with_two_deltas(tiny, tuned2, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from eft_local.cli import main

    (tmp_path / "recipes.toml").write_text(f"""
[mix]
description = "two deltas"
deltas = [["tuned", "reference", 0.5], ["tuned2", "reference", 0.5]]
[mix.base]
path = "{tiny['base']}"
[mix.tuned]
path = "{tiny['tuned']}"
[mix.reference]
path = "{tiny['reference']}"
[mix.tuned2]
path = "{tuned2}"
""")
    monkeypatch.setenv("EFT_LOCAL_MODELS_DIR", str(tmp_path))
    check = CliRunner().invoke(main, ["check", "--recipe", "mix"])
    assert check.exit_code == 0, check.output
    assert "tuned2" in check.stdout
    out = CliRunner().invoke(main, ["generate", "--recipe", "mix", "Hello world", "--temperature", "0", "-n", "8", "--json"])
    assert out.exit_code == 0, out.output
    want = []
    with EFT(tiny["base"], deltas=[(tiny["tuned"], tiny["reference"], 0.5), (tuned2, tiny["reference"], 0.5)]) as eft:
        want = eft.generate("Hello world", temperature=0, max_tokens=8).tokens
    assert json.loads(out.stdout)["tokens"] == want
    # A delta naming a model the recipe lacks makes the file invalid, with a one-line error.
    with open(tmp_path / "recipes.toml", "a") as f:
        f.write('[bad]\ndeltas = [["tuned", "nobody"]]\n[bad.base]\npath = "b.gguf"\n'
                '[bad.tuned]\npath = "t.gguf"\n[bad.reference]\npath = "r.gguf"\n')
    bad = CliRunner().invoke(main, ["check", "--recipe", "mix"])
    assert bad.exit_code == 1 and "'nobody'" in bad.stderr and bad.stderr.count("\n") == 1
