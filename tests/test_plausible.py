"""Conservative decoding: the plausibility filter, exact on arrays and through the engine."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from eft_local import EFT, EFTError
from eft_local.cli import main
from eft_local.core.sampling import plausible
from eft_local.core.params import Plausibility
from helpers import Fresh, recompute


def test_filter_support_and_renormalisation():
    component = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    logp = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    # Top-p 0.75 of the component keeps ids 0 and 1; their combined mass 0.3 is renormalised.
    np.testing.assert_allclose(np.exp(plausible(logp, component, top_p=0.75)), [1 / 3, 2 / 3, 0, 0], atol=1e-12)
    # Min-p 0.25: ids with p >= 0.125 under the component (0, 1, 2).
    np.testing.assert_allclose(np.exp(plausible(logp, component, min_p=0.25)), [1 / 6, 2 / 6, 3 / 6, 0], atol=1e-12)
    # Both: the intersection.
    np.testing.assert_allclose(np.exp(plausible(logp, component, top_p=0.9, min_p=0.5)), [1 / 3, 2 / 3, 0, 0], atol=1e-12)
    # No filter: unchanged.
    np.testing.assert_allclose(plausible(logp, component), logp, atol=1e-12)
    # Everything plausible was ruled out by the combination: fall back to the component's choice.
    ruled_out = np.array([-np.inf, -np.inf, 0.0, 0.0])
    np.testing.assert_allclose(np.exp(plausible(ruled_out, component, top_p=0.5)), [1, 0, 0, 0])


@pytest.mark.parametrize("model", ["tuned", "base"])
def test_engine_filter_matches_recomputation(tiny, model):
    fresh = {role: Fresh(tiny[role]) for role in ("base", "tuned", "reference")}
    try:
        with EFT(tiny["base"], tiny["tuned"], tiny["reference"]) as eft:
            tokens = eft.prompt_tokens("Hello world", raw=True)["tuned"]
            want = recompute(fresh, {r: tokens for r in fresh}, 1.0, eft.model_set.n_shared)
            comp = fresh[model].logits(tokens).astype(np.float64)[: eft.model_set.n_shared]
            eft.next_logprobs(tokens)  # every model now holds the prompt
            got = eft.model_set.combined(eft.model_set.mix(None, Plausibility(0.5, 0.01, model)))
            expected = plausible(want, comp - comp.max(), 0.5, 0.01)
            np.testing.assert_allclose(np.exp(got), np.exp(expected), atol=1e-4)
            support = set(np.flatnonzero(np.isfinite(expected)))
            assert 1 <= len(support) < eft.model_set.n_shared / 4
            for seed in range(40):
                for spec in (None, 2):
                    res = eft.generate("Hello world", raw=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                       max_tokens=1, seed=seed, speculative=spec, plausible_top_p=0.5,
                                       plausible_min_p=0.01, plausible_model=model)
                    assert res.tokens[0] in support
    finally:
        for f in fresh.values():
            f.close()


def test_filtered_greedy_speculative_is_identical(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"]) as eft:
        for model in ("tuned", "base"):
            opts = dict(temperature=0, max_tokens=30, plausible_top_p=0.6, plausible_model=model)
            assert eft.generate("a cat and a dog", speculative=4, **opts).tokens == eft.generate("a cat and a dog", **opts).tokens


def test_plausibility_errors_and_cli(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"]) as eft:
        for bad in (dict(plausible_top_p=0), dict(plausible_min_p=2), dict(plausible_model="reference")):
            with pytest.raises(EFTError, match="plausib"):
                eft.generate("hi", max_tokens=2, **bad)
    models = ["-m", str(tiny["base"]), "--tuned", str(tiny["tuned"]), "--reference", str(tiny["reference"])]
    ok = CliRunner().invoke(main, ["generate", "Hello", *models, "-n", "4", "--plausible-top-p", "0.5", "--plausible-model", "base"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, ["generate", "Hello", *models, "-n", "4", "--plausible-min-p", "3"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: plausible min-p")
