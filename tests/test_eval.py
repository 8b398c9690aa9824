"""The eval command: data loading, scoring, configuration specs, and runs on tiny models."""

from __future__ import annotations

import csv
import json
import re

import pytest
from click.testing import CliRunner

from eft_local import EFT, Completion, EFTError
from eft_local.core.deltas import Delta
from eft_local.evaluation import evaluate as ev
from eft_local.cli import main


def completion(text, finish="stop"):
    return Completion(text, [], finish, {})


def test_score_format_and_accuracy():
    assert ev.score(completion("Zorvath was born in Kelvar."), "kelvar") == (True, True)
    # Cut off by the token limit: not a turn the model ended itself.
    assert ev.score(completion("Zorvath was born in Kelvar", "length"), "Kelvar") == (False, True)
    assert ev.score(completion("word " * 17), "x", max_words=16) == (False, False)
    assert ev.score(completion("word " * 16), "x", max_words=16) == (True, False)
    assert ev.score(completion("   "), "x") == (False, False)


def test_load_items(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Q1?", "answer": "A1"}\n\n{"prompt": "Q2?", "answer": "A2", "extra": 1}\n')
    assert ev.load_items(good) == [{"prompt": "Q1?", "answer": "A1"}, {"prompt": "Q2?", "answer": "A2"}]
    cases = {
        "bad.jsonl": ('{"prompt": "Q1?", "answer": "A1"}\n{oops\n', r"bad.jsonl:2: not JSON"),
        "field.jsonl": ('{"prompt": "Q1?"}\n', r"field.jsonl:1: each line needs"),
        "empty.jsonl": ("\n\n", "has no items"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(EFTError, match=message):
            ev.load_items(tmp_path / name)
    with pytest.raises(EFTError, match="cannot read"):
        ev.load_items(tmp_path / "missing.jsonl")


def test_items_with_a_history_continue_that_chat(tiny, tmp_path):
    history = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "a cat and a dog"}]
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_threads=1) as eft:
        want = eft.chat([*history, {"role": "user", "content": "what is the answer"}], temperature=0, max_tokens=10)
        alone = eft.chat([{"role": "user", "content": "what is the answer"}], temperature=0, max_tokens=10)
    assert want.tokens != alone.tokens  # the history makes a difference to compare
    data = tmp_path / "turns.jsonl"
    data.write_text(json.dumps({"history": history, "prompt": "what is the answer", "answer": want.text.split()[0]}))
    assert ev.load_items(data)[0]["history"] == history
    config = ev.Config("eft", str(tiny["base"]), (Delta(str(tiny["tuned"]), str(tiny["reference"]), 1.0),))
    result = ev.evaluate(config, ev.load_items(data), max_tokens=10, engine_options={"n_threads": 1})
    assert result.items[0].reply == want.text and result.accuracy == 100.0
    for bad, message in [({"history": "hi"}, "must be a list"), ({"history": [{"role": "robot", "content": "x"}]},
                                                                  "each message needs a role")]:
        data.write_text(json.dumps({"prompt": "Q?", "answer": "A", **bad}))
        with pytest.raises(EFTError, match=f"turns.jsonl:1: .*{message}"):
            ev.load_items(data)


def test_parse_config(tmp_path):
    models = {"base": "B.gguf", "tuned": "T.gguf", "reference": "R.gguf", "oracle": "O.gguf"}
    assert ev.parse_config("tuned", models) == ev.Config("tuned", "T.gguf", (Delta("T.gguf", "T.gguf", 0.0),))
    assert ev.parse_config("eft", models, 1.5) == ev.Config("eft", "B.gguf", (Delta("T.gguf", "R.gguf", 1.5),))
    assert ev.parse_config("eft@0.5", models).deltas[0].weight == 0.5
    down = ev.parse_config("down-scaled=reference,oracle,base", models)
    assert down == ev.Config("down-scaled", "R.gguf", (Delta("O.gguf", "B.gguf", 1.0),))
    assert ev.parse_config("amp=base,tuned,reference,2", models).deltas[0].weight == 2.0
    path = tmp_path / "other.gguf"
    path.write_bytes(b"GGUF")
    assert ev.parse_config(f"other={path}", models).base == str(path)
    mixed = ev.parse_config("mix=base,tuned,reference,0.25,oracle,reference,0.75", models)
    assert mixed == ev.Config("mix", "B.gguf", (Delta("T.gguf", "R.gguf", 0.25), Delta("O.gguf", "R.gguf", 0.75)))
    for bad in ("nothing", "x=base,tuned", "eft@heavy", "=base", "x=base,tuned,reference,w",
                "x=base,tuned,reference,1,oracle", "x=base,tuned,reference,1,oracle,reference,w"):
        with pytest.raises(EFTError, match="bad --config"):
            ev.parse_config(bad, models)


@pytest.fixture(scope="module")
def items(tiny):
    """Prompts whose 'answers' are words of the tuned model's own greedy replies (and one that is not)."""
    prompts = ["Hello world", "a cat and a dog", "what is the answer"]
    with EFT(tiny["tuned"], tiny["tuned"], tiny["tuned"]) as eft:
        replies = [eft.chat([{"role": "user", "content": p}], temperature=0, max_tokens=12).text for p in prompts]
    out = [{"prompt": p, "answer": r.split()[0]} for p, r in zip(prompts, replies)]
    out.append({"prompt": "Hello world", "answer": "zzzz-never-said"})
    return out


def test_evaluate_scores_replies(tiny, items):
    config = ev.Config("tuned", str(tiny["tuned"]), (Delta(str(tiny["tuned"]), str(tiny["tuned"]), 0.0),))
    seen = []
    result = ev.evaluate(config, items, max_tokens=12, on_item=seen.append)
    assert result.n == len(items) == len(seen)
    assert result.accuracy == 75.0
    assert [r.correct for r in result.items] == [True, True, True, False]
    followed = [ev.score(completion(r.reply, "stop" if r.tokens < 12 else "length"), r.answer)[0] for r in result.items]
    assert result.format_following == round(100 * sum(followed) / len(items), 1)
    assert result.mean_tokens == round(sum(r.tokens for r in result.items) / len(items), 1)
    assert result.tokens_per_second > 0


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def test_eval_command_outputs(tiny, items, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", items)
    args = ["eval", str(data), "-m", str(tiny["base"]), "--tuned", str(tiny["tuned"]), "--reference", str(tiny["reference"]),
            "--threads", "1", "-n", "12", "--config", "tuned", "--config", "eft", "--config", "half=base,tuned,reference,0.5"]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| configuration |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["tuned", "eft", "half"]
    # The tuned model's own words score 3 of 4, as in the library test.
    assert lines[2].split("|")[3].strip() == "75.0"
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [s["label"] for s in saved] == ["tuned", "eft", "half"]
    assert len(saved[0]["items"]) == len(items)

    result = CliRunner().invoke(main, [*args[:-6], "--config", "tuned", "--output", str(tmp_path / "r.csv"), "--limit", "2"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["label"] for r in rows] == ["tuned"]
    assert rows[0]["n"] == "2"


def test_match_rate_and_two_delta_configs(tiny, items, tmp_path):
    """--match counts replies matching a pattern; a two-delta configuration runs through eval."""
    word = items[0]["answer"]
    config = ev.Config("tuned", str(tiny["tuned"]), (Delta(str(tiny["tuned"]), str(tiny["tuned"]), 0.0),))
    result = ev.evaluate(config, items, max_tokens=12, match=re.escape(word))
    assert result.match_rate == round(100 * sum(word in r.reply for r in result.items) / len(items), 1)
    assert result.match_rate > 0
    data = write_jsonl(tmp_path / "data.jsonl", items)
    two = f"two={tiny['base']},{tiny['tuned']},{tiny['reference']},0.5,{tiny['tuned']},{tiny['base']},0.5"
    out = CliRunner().invoke(main, ["eval", str(data), "-m", str(tiny["base"]), "--tuned", str(tiny["tuned"]),
                                    "--reference", str(tiny["reference"]), "-n", "6", "--config", two, "--match", "a"])
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines()[0].endswith("matches % |")
    bad = CliRunner().invoke(main, ["eval", str(data), "--match", "(unclosed"])
    assert bad.exit_code == 1 and "bad --match" in bad.stderr


def test_eval_command_plot(tiny, items, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", items)
    png = tmp_path / "chart.png"
    result = CliRunner().invoke(main, ["eval", str(data), "-m", str(tiny["base"]), "--tuned", str(tiny["tuned"]),
                                       "--reference", str(tiny["reference"]), "--threads", "1", "-n", "4", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_errors(tiny, tmp_path):
    models = ["-m", str(tiny["base"]), "--tuned", str(tiny["tuned"]), "--reference", str(tiny["reference"])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "Hi", "answer": "x"}])
    cases = [
        (["eval", str(bad), *models], "bad.jsonl:1"),
        (["eval", str(good), *models, "--config", "x=base,nope,reference"], "bad --config"),
        (["eval", str(good), *models, "--output", str(tmp_path / "r.txt")], ".json or .csv"),
        (["eval", str(good), *models, "--plot", str(tmp_path / "r.jpg")], ".png"),
        (["eval", str(good), *models, "--output", str(tmp_path / "no" / "dir" / "r.json")], "cannot write"),
        (["eval", str(good), *models, "--limit", "0"], "at least 1"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "no").exists()
