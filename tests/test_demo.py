"""The bundled demo triple: compatible, small, the default, and EFT visibly working on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from eft_local.evaluation import evaluate as ev
from eft_local.cli import main
from eft_local.hub.recipes import models_dir, resolve

DEMO = models_dir() / "demo"
N_ITEMS = 120


@pytest.fixture(scope="module")
def demo() -> dict[str, Path]:
    return {role: Path(p) for role, p in resolve("demo").items()}


def body_params(path: Path) -> int:
    """Parameters outside the token embedding and output matrices."""
    reader = gguf.GGUFReader(path)
    return sum(int(np.prod(t.shape)) for t in reader.tensors if t.name not in ("token_embd.weight", "output.weight"))


def test_demo_files_are_small_and_the_base_is_large(demo):
    shipped = sum(demo[role].stat().st_size for role in ("base", "tuned", "reference"))
    assert shipped <= 25 * 1024 * 1024
    assert body_params(demo["base"]) >= 8 * body_params(demo["reference"])
    assert body_params(demo["tuned"]) == body_params(demo["reference"])


def test_demo_is_the_default_and_passes_the_vocabulary_check(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 0, result.output
    assert str(DEMO / "base.gguf") in result.stdout and "compatible" in result.stdout


def test_default_generate_answers_offline(monkeypatch):
    """The README's main command: a held-out question, answered by EFT on the demo triple."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = ev.load_items(DEMO / "heldout.jsonl")
    answered = 0
    for item in items[:5]:
        result = CliRunner().invoke(main, ["generate", "--temperature", "0", "--json", item["prompt"]])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["finish_reason"] == "stop" and 0 < len(out["text"].split()) <= ev.MAX_WORDS
        answered += item["answer"].casefold() in out["text"].casefold()
    assert answered >= 3


@pytest.fixture(scope="module")
def scores(demo) -> dict[str, ev.ConfigResult]:
    items = ev.load_items(DEMO / "heldout.jsonl")[:N_ITEMS]
    configs = ["tuned", "base", "eft", "oracle"]
    return {c: ev.evaluate(ev.parse_config(c, {k: str(v) for k, v in demo.items()}), items) for c in configs}


def test_up_scaling_adds_the_base_models_knowledge(scores):
    """The issue's targets on held-out questions, asserted on a subset of them."""
    assert scores["eft"].accuracy >= 2 * scores["tuned"].accuracy
    assert scores["eft"].accuracy >= scores["oracle"].accuracy - 15
    assert scores["eft"].format_following >= 90
    assert scores["base"].format_following < 30


def test_turns_two_and_three_of_a_chat_answer_the_question_asked(demo):
    """Questions about held-out people asked as turns 2 and 3 of a chat: the tuned model learned
    chats of several turns, so EFT answers the latest question, not an earlier one."""
    items = ev.load_items(DEMO / "heldout_turns.jsonl")[:N_ITEMS]
    assert all(len(item["history"]) in (2, 4) for item in items)
    config = ev.parse_config("eft", {k: str(v) for k, v in demo.items()})
    result = ev.evaluate(config, items)
    assert result.accuracy >= 90 and result.format_following >= 90


def test_speculative_demo_is_identical_and_accepts_drafts(demo):
    items = ev.load_items(DEMO / "heldout.jsonl")[:10]
    config = ev.parse_config("eft", {k: str(v) for k, v in demo.items()})
    plain = ev.evaluate(config, items)
    spec = ev.evaluate(config, items, speculative=4)
    assert [r.reply for r in spec.items] == [r.reply for r in plain.items]
    assert spec.acceptance_rate is not None and spec.acceptance_rate > 40


def test_models_lists_the_demo_as_present():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo"))
    block = lines[start : start + 5]
    assert "(default)" in block[0]
    assert all("present" in line for line in block[1:5])


def test_runtime_does_not_import_torch():
    """Only the demo's training script needs torch."""
    code = "import sys, eft_local.cli, eft_local.engine.eft, eft_local.evaluation.evaluate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_mixing_two_deltas_is_a_monotone_trade_off(demo):
    """Weight lam on the second style's delta, 1 - lam on the first: style B's share never falls."""
    items = ev.load_items(DEMO / "heldout.jsonl")[:40]
    models = {k: str(v) for k, v in demo.items()}
    shares = []
    for lam in (0.0, 0.5, 1.0):
        spec = f"mix={','.join(['base', 'tuned', 'reference', str(1 - lam), 'tuned_b', 'reference', str(lam)])}"
        r = ev.evaluate(ev.parse_config(spec, models), items, match=r"^\s*They\b")
        assert r.format_following >= 90 and r.accuracy >= 75
        shares.append(r.match_rate)
    assert shares == sorted(shares)
    assert shares[0] <= 10 and shares[-1] >= 90
