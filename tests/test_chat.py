"""The chat's commands (Ollama's habits) and the context shift, in the library, the chat and the server."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from eft_local import EFT, EFTError
from eft_local.chat.prompt import without_oldest_turn
from eft_local.cli import main
from eft_local.cli.chat import chat_loop
from eft_local.cli.chat_commands import COMMANDS, command_lines
from test_cli import FakeEFT, script
from test_server import Server

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
QUESTIONS = ["Where was Patroul born?", "What does Patroul like to eat?", "What does Patroul do for a living?",
             "What is the favourite colour of Patroul?"]


def talk(eft, *lines, options=None, system=None) -> tuple[list[dict], str]:
    out = io.StringIO()
    conv = chat_loop(eft, dict(options or {"temperature": 0.0}), system=system, read=script(*lines), out=out)
    return conv, out.getvalue()


@pytest.fixture(scope="module")
def demo():
    with EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf", n_threads=1) as eft:
        yield eft


# --- commands ------------------------------------------------------------------------------------


def test_help_lists_every_command_in_the_chat_and_in_chat_help():
    _, out = talk(FakeEFT(), "/help", "/?", "/exit")
    assert out.count("/set parameter NAME VALUE") == 2
    for usage, _ in COMMANDS.values():
        assert usage in out
    help_text = CliRunner().invoke(main, ["chat", "--help"]).stdout
    assert all(line in help_text for line in command_lines())


def test_set_parameter_changes_the_next_turns_options():
    eft = FakeEFT(["one"], ["two"])
    conv, out = talk(eft, "/set parameter temperature 0.5", "/set parameter top-k 3", "/set parameter num_predict 7",
                     "/set parameter stop end over", "/set parameter context_shift off", "hi",
                     "/set parameter temperature hot", "/set parameter top_k -2", "/set parameter nonsense 1",
                     "again", "/exit", options={"temperature": 0.0, "max_tokens": 20})
    want = {"temperature": 0.5, "top_k": 3, "max_tokens": 7, "stop": ("end", "over"), "context_shift": False}
    assert eft.calls[0][1] == want
    assert eft.calls[1][1] == want  # the bad values changed nothing
    assert "(temperature 0.5)" in out and "(max_tokens 7)" in out
    assert "error: 'hot' is not a value for temperature" in out
    assert "error: top_k must be an integer of at least 0" in out
    assert "usage: /set parameter NAME VALUE" in out


def test_set_system_clear_and_multi_line_messages():
    eft = FakeEFT(["a"], ["b"])
    conv, out = talk(eft, "/set system Be brief.", '"""First line', "second line", 'third"""', "/clear",
                     '"""one line"""', "/exit")
    assert eft.calls[0][0] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "First line\nsecond line\nthird"}]
    assert "(conversation cleared)" in out
    assert conv == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one line"},
                    {"role": "assistant", "content": "b"}]


def test_save_and_load_keep_the_conversation_and_a_failed_save_loses_nothing(tmp_path):
    saved = tmp_path / "chat.json"
    eft = FakeEFT(["Fine"], ["Again"])
    conv, out = talk(eft, "How are you?", f"/save {saved}", "/clear", f"/load {saved}", "And now?", "/exit",
                     system="sys")
    assert json.loads(saved.read_text())["messages"] == conv[:3]
    assert eft.calls[1][0] == [*conv[:3], {"role": "user", "content": "And now?"}]
    assert f"(saved 3 messages to {saved})" in out and f"(loaded 3 messages from {saved})" in out
    before = saved.read_bytes()
    (tmp_path / "not-json.json").write_text("{oops")
    _, out = talk(FakeEFT(), f"/save {tmp_path / 'missing' / 'x.json'}", f"/load {tmp_path / 'not-json.json'}",
                  f"/load {tmp_path / 'none.json'}", f"/save {tmp_path}", "/exit")
    lines = [line for line in out.splitlines() if "error:" in line]
    assert len(lines) == 4 and "cannot save" in lines[0] and "is not a saved chat" in lines[1]
    assert "cannot load" in lines[2] and "cannot save" in lines[3]
    assert saved.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["chat.json", "not-json.json"]


def test_show_tells_models_weights_options_and_context(tiny):
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_threads=1) as eft:
        _, out = talk(eft, "/show", "Hello world", "/weight 0.5", "/show", "/exit",
                      options={"temperature": 0.0, "max_tokens": 4})
        n_ctx = eft.model_set.n_ctx
    first, second = out.split("  base ")[1:]
    assert str(tiny["base"]) in first and str(tiny["reference"]) in first
    assert "delta 1 1" in first and "delta 1 0.5" in second and "temperature 0.0" in first
    assert f"context      0 of {n_ctx} tokens, 0 messages" in first
    used = int(second.split("\n  context ")[1].split()[0])
    assert 0 < used < n_ctx and "2 messages" in second


# --- the context shift ---------------------------------------------------------------------------


def test_the_oldest_turn_goes_and_the_system_message_and_last_question_stay():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "1"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "2"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "3"}]
    assert without_oldest_turn(chat) == [chat[0], *chat[3:]]
    assert without_oldest_turn(without_oldest_turn(chat)) == [chat[0], chat[5]]
    assert without_oldest_turn([chat[0], chat[5]]) is None


def test_a_chat_longer_than_the_context_leaves_out_its_oldest_turns(demo):
    chat = []
    for i in range(24):
        chat += [{"role": "user", "content": QUESTIONS[i % 4]}, {"role": "assistant", "content": "Their birthplace is Caltal."}]
    chat.append({"role": "user", "content": QUESTIONS[1]})
    with pytest.raises(EFTError, match="context holds 512"):
        demo.chat(chat, temperature=0, max_tokens=8)
    shifted = demo.chat(chat, temperature=0, max_tokens=8, context_shift=True)
    dropped = shifted.stats["dropped_messages"]
    assert dropped > 0 and dropped % 2 == 0
    # The reply is the one to what fits: the last turns, room for the reply left.
    assert shifted.tokens == demo.chat(chat[dropped:], temperature=0, max_tokens=8).tokens
    prompt = max(len(t) for t in demo.prompt_tokens(messages=chat[dropped:]).values())
    assert prompt + 8 <= demo.model_set.n_ctx
    assert demo.chat(chat[-3:], temperature=0, context_shift=True).stats["dropped_messages"] == 0


def test_a_reply_cut_by_the_end_of_the_context_says_so(demo):
    prompt = "The history of the old city begins with"
    reply = demo.generate(prompt, raw=True, ignore_eos=True, max_tokens=1000, temperature=0)
    assert reply.finish_reason == "length" and reply.stats["context_full"]
    assert "context_full" not in demo.generate(prompt, raw=True, ignore_eos=True, max_tokens=5).stats


def test_a_forty_turn_chat_never_errors_and_still_answers_right():
    lines = [QUESTIONS[i % 4] for i in range(40)]
    result = CliRunner().invoke(main, ["chat", "-t", "1", "--temp", "0"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.count("its oldest turns are left out") == 1
    replies = [line for line in result.stdout.replace(">>> ", "\n").splitlines() if line.startswith("Their ")]
    assert len(replies) == 40
    # The last questions, long after the first turns left the context, are answered right.
    answers = {QUESTIONS[0]: "Caltal", QUESTIONS[1]: "olives", QUESTIONS[2]: "fisher", QUESTIONS[3]: "white"}
    assert all(answers[q] in reply for q, reply in zip(lines[-8:], replies[-8:])), replies[-8:]
    off = CliRunner().invoke(main, ["chat", "-t", "1", "--temp", "0", "--no-context-shift"],
                             input="\n".join(lines) + "\n")
    assert "prompt has" in off.stderr and "/clear starts a new conversation" in off.stderr


def test_the_server_shifts_only_when_asked():
    chat = []
    for i in range(24):
        chat += [{"role": "user", "content": QUESTIONS[i % 4]}, {"role": "assistant", "content": "Their birthplace is Caltal."}]
    chat.append({"role": "user", "content": QUESTIONS[0]})
    plain, shifting = Server(), Server("--context-shift")
    try:
        with pytest.raises(openai.BadRequestError, match="context holds 512"):
            plain.client().chat.completions.create(model="demo", messages=chat, temperature=0)
        asked = plain.client().chat.completions.create(model="demo", messages=chat, temperature=0,
                                                       extra_body={"context_shift": True})
        by_default = shifting.client().chat.completions.create(model="demo", messages=chat, temperature=0)
        assert asked.choices[0].message.content == by_default.choices[0].message.content
        assert asked.choices[0].finish_reason == "stop"
    finally:
        plain.stop()
        shifting.stop()
