"""The ``eft-local`` command line: generate, check, chat, and how bad input is reported."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from eft_local.cli import main
from eft_local.cli.chat import LEAVE_HINT, chat_loop
from eft_local.core.deltas import parse_delta
from eft_local.engine.eft import EFT, Chunk
from eft_local.core.errors import EFTError
from tiny_gguf import ALT_DIFF_ID, ALT_DIFF_TEXT, BASE_DIFF_TEXT, N_VOCAB_BASE

EFT_LOCAL = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "eft-local"
GREEDY = ["--temperature", "0", "-n", "12"]
PROMPT = "Hello world"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    # The debug switch turns unexpected errors back into tracebacks; these tests check the default.
    monkeypatch.delenv("EFT_LOCAL_DEBUG", raising=False)


def models(tiny, base="base", tuned="tuned", reference="reference") -> list[str]:
    """The three model options; each role names a key of ``tiny`` or is a path."""

    def path(x):
        return str(tiny[x]) if x in tiny else str(x)

    return ["-m", path(base), "--tuned", path(tuned), "--reference", path(reference)]


# One thread per model: with all cores each, llama.cpp's spinning threads make runs crawl
# when other processes share the machine.
THREADS = ["--threads", "1"]


def invoke(args: list[str], input: str | None = None) -> Result:
    if args and args[0] in ("generate", "chat"):
        args = [*args, *THREADS]
    return CliRunner().invoke(main, args, input=input)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_error_line(result: Result) -> str:
    """Exit status 1, one ``error: ...`` line on stderr, no traceback; returns the line."""
    # CliRunner swallows uncaught exceptions into result.exception (exit code 1 too), so a
    # clean exit is proved by the exception being the SystemExit that fail() raises.
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def generate_json(tiny, *args: str, prompt: str = PROMPT, **roles: str) -> dict:
    result = ok(invoke(["generate", prompt, *models(tiny, **roles), "--json", *args]))
    return json.loads(result.stdout)


# --- generate ------------------------------------------------------------------------------


def test_generate_greedy_is_deterministic(tiny):
    """Greedy generation prints text and repeats itself exactly."""
    first = ok(invoke(["generate", PROMPT, *models(tiny), *GREEDY]))
    second = ok(invoke(["generate", PROMPT, *models(tiny), *GREEDY]))
    assert first.stdout.strip()
    assert first.stdout.endswith("\n")
    assert first.stdout == second.stdout
    assert first.stderr == ""


def test_generate_json_matches_stream(tiny):
    """--json prints one object whose text is what streaming prints."""
    result = ok(invoke(["generate", PROMPT, *models(tiny), *GREEDY, "--json"]))
    assert len(result.stdout.strip().splitlines()) == 1
    obj = json.loads(result.stdout)
    assert set(obj) == {"text", "tokens", "finish_reason", "stats", "usage"}
    assert obj["finish_reason"] in {"stop", "length"}
    stats = obj["stats"]
    # The OpenAI API's names for the counts.
    assert obj["usage"] == {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
                            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"]}
    assert {"prompt_tokens", "completion_tokens", "tokens_per_second"} <= set(stats)
    assert len(obj["tokens"]) == stats["completion_tokens"] <= 12
    assert stats["prompt_tokens"] > 0
    assert all(isinstance(t, int) and 0 <= t < N_VOCAB_BASE for t in obj["tokens"])
    if obj["finish_reason"] == "length":
        assert stats["completion_tokens"] == 12

    streamed = ok(invoke(["generate", PROMPT, *models(tiny), *GREEDY]))
    assert streamed.stdout == obj["text"] + "\n"


def test_generate_seed_reproducible_and_seeds_differ(tiny):
    """The same seed repeats a sampled output; different seeds do not all agree."""
    sampled = ["--temperature", "0.9", "-n", "12"]
    a = generate_json(tiny, *sampled, "--seed", "7")
    b = generate_json(tiny, *sampled, "--seed", "7")
    assert (a["text"], a["tokens"]) == (b["text"], b["tokens"])
    outputs = {tuple(generate_json(tiny, *sampled, "--seed", str(s))["tokens"]) for s in range(1, 6)}
    assert len(outputs) >= 2


def test_generate_raw_differs_from_chat(tiny):
    """--raw skips the chat template, so the model sees fewer tokens."""
    chat = generate_json(tiny, *GREEDY)
    raw = generate_json(tiny, *GREEDY, "--raw")
    assert raw["tokens"]
    assert raw["stats"]["prompt_tokens"] < chat["stats"]["prompt_tokens"]


def test_generate_weight_zero_ignores_tuned_pair(tiny):
    """--weight 0 samples the base model alone: swapping tuned and reference changes nothing."""
    plain = generate_json(tiny, *GREEDY, "--weight", "0")
    swapped = generate_json(tiny, *GREEDY, "--weight", "0", tuned="reference", reference="tuned")
    assert plain["tokens"]
    assert plain["tokens"] == swapped["tokens"]
    # With the delta switched on, the swap does matter (otherwise the check above proves nothing).
    assert generate_json(tiny, *GREEDY)["tokens"] != generate_json(
        tiny, *GREEDY, tuned="reference", reference="tuned")["tokens"]


def test_generate_stop_string(tiny):
    """Output ends right before the first occurrence of a --stop string, which is not printed."""
    text = generate_json(tiny, *GREEDY)["text"]
    mid = len(text) // 2
    stop = next(text[i:i + 2] for i in range(mid, len(text) - 1) if text[i:i + 2].strip())
    expected = text[: text.find(stop)]
    assert expected, "stop string should not be at the very start"

    result = ok(invoke(["generate", PROMPT, *models(tiny), *GREEDY, "--stop", stop]))
    assert result.stdout == expected + "\n"
    assert stop not in result.stdout
    obj = generate_json(tiny, *GREEDY, "--stop", stop)
    assert obj["text"] == expected
    assert obj["finish_reason"] == "stop"


def test_generate_prompt_from_stdin(tiny):
    """Without a PROMPT argument the prompt is read from standard input."""
    piped = ok(invoke(["generate", *models(tiny), *GREEDY], input=PROMPT))
    given = ok(invoke(["generate", PROMPT, *models(tiny), *GREEDY]))
    assert piped.stdout.strip()
    assert piped.stdout == given.stdout


def test_generate_with_padded_base_and_no_template(tiny):
    """A padded base and a tuned model without a chat template still generate."""
    obj = generate_json(tiny, *GREEDY, base="padded", tuned="no_template")
    assert obj["tokens"]
    # Padding ids lie outside the shared vocabulary and are never sampled.
    assert all(t < N_VOCAB_BASE for t in obj["tokens"])


def test_generate_concurrent(tiny):
    """--concurrent runs the models in threads and gives the same greedy output."""
    sequential = generate_json(tiny, *GREEDY)
    threaded = generate_json(tiny, *GREEDY, "--concurrent")
    assert threaded["tokens"] == sequential["tokens"]


# --- check ---------------------------------------------------------------------------------


def test_check_compatible(tiny):
    result = ok(invoke(["check", *models(tiny)]))
    assert f"compatible: {N_VOCAB_BASE} shared token ids" in result.stdout
    for role in ("base", "tuned", "reference"):
        assert str(tiny[role]) in result.stdout
    assert result.stderr == ""


def test_check_padded_base(tiny):
    """Trailing padding ids are not an incompatibility; the shared range is the real vocabulary."""
    result = ok(invoke(["check", *models(tiny, base="padded")]))
    assert f"compatible: {N_VOCAB_BASE} shared token ids" in result.stdout
    assert "padding" in result.stdout


def test_check_no_template_note(tiny):
    result = ok(invoke(["check", *models(tiny, tuned="no_template")]))
    assert "no chat template" in result.stdout
    assert "compatible:" in result.stdout


def test_check_incompatible(tiny):
    """A vocabulary differing at one id fails with a message naming files, id and texts."""
    result = invoke(["check", *models(tiny, tuned="alt")])
    line = assert_error_line(result)
    assert str(tiny["base"]) in line and str(tiny["alt"]) in line
    assert str(ALT_DIFF_ID) in line
    assert BASE_DIFF_TEXT in line and ALT_DIFF_TEXT in line
    # The per-model report comes before the verdict, so it is still shown.
    assert str(tiny["alt"]) in result.stdout
    assert "llama tokenizer" in result.stdout
    assert "compatible:" not in result.stdout


# --- bad input -----------------------------------------------------------------------------


@pytest.fixture
def bad_files(tiny, tmp_path) -> dict[str, tuple[Path, str]]:
    """Broken model files and the words their error message must contain."""
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(Path(tiny["tuned"]).read_bytes()[:100])
    return {
        "missing": (tmp_path / "missing.gguf", "not found"),
        "text": (text, "not a GGUF file"),
        "empty": (empty, "not a GGUF file"),
        "truncated": (truncated, "truncated"),
    }


@pytest.mark.parametrize("command", ["generate", "check"])
@pytest.mark.parametrize("kind", ["missing", "text", "empty", "truncated"])
def test_bad_model_file(tiny, bad_files, command, kind):
    path, words = bad_files[kind]
    args = [command, *([PROMPT] if command == "generate" else []), *models(tiny, tuned=path)]
    line = assert_error_line(invoke(args))
    assert words in line
    assert str(path) in line


def test_truncated_weights(tiny, tmp_path):
    """Intact metadata but cut-off tensor data fails the header check, before llama.cpp loads it."""
    cut = tmp_path / "cut.gguf"
    data = Path(tiny["tuned"]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    line = assert_error_line(invoke(["generate", PROMPT, *models(tiny, tuned=cut)]))
    assert f"{cut}: truncated: has {len(data) // 2} bytes, header describes" in line


def test_generate_incompatible_vocabularies(tiny):
    line = assert_error_line(invoke(["generate", PROMPT, *models(tiny, reference="alt"), *GREEDY]))
    assert "incompatible vocabularies" in line
    assert str(ALT_DIFF_ID) in line


def test_prompt_longer_than_context(tiny):
    """A prompt that does not fit names both sizes and the option to raise."""
    prompt = " ".join(["the capital of France is Paris and the dog is a cat"] * 40)
    line = assert_error_line(invoke(["generate", prompt, *models(tiny), "--ctx-size", "256", *GREEDY]))
    m = re.search(r"prompt has (\d+) tokens but the context holds (\d+)", line)
    assert m, line
    n_prompt, n_ctx = int(m[1]), int(m[2])
    # llama.cpp may round a small context up, so only the ordering is fixed.
    assert n_prompt > n_ctx >= 256
    assert "--ctx-size" in line


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--top-p", "1.5", "top_p"),
        ("--temperature", "nan", "temperature"),
        ("--min-p", "2", "min_p"),
        ("--top-k", "-3", "top_k"),
        ("-n", "0", "max_tokens"),
        ("--weight", "nan", "weight"),
        ("--ctx-size", "4", "context size"),
    ],
)
def test_invalid_values(tiny, option, value, words):
    line = assert_error_line(invoke(["generate", PROMPT, *models(tiny), option, value]))
    assert words in line


def test_unknown_recipe(tiny):
    result = invoke(["generate", PROMPT, "--recipe", "no-such-recipe"])
    assert_error_line(result)
    assert "no-such-recipe" in result.stderr


def test_non_numeric_temperature(tiny):
    result = invoke(["generate", PROMPT, *models(tiny), "--temperature", "hot"])
    assert result.exit_code == 2
    assert "--temperature" in result.stderr


@pytest.mark.parametrize("prompt, stdin", [(" \n ", None), (None, "")])
def test_empty_prompt(tiny, prompt, stdin):
    """A blank argument or empty standard input is a usage error."""
    args = ["generate", *([prompt] if prompt is not None else []), *models(tiny)]
    result = invoke(args, input=stdin)
    assert result.exit_code == 2
    assert "prompt is empty" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("case", ["incompatible", "truncated_weights"])
def test_subprocess_error_has_no_traceback(tiny, tmp_path, case):
    """In a real process the failure is one stderr line and exit status 1."""
    if case == "incompatible":
        args = models(tiny, tuned="alt")
    else:
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(Path(tiny["tuned"]).read_bytes()[:300_000])
        args = models(tiny, tuned=cut)
    env = {k: v for k, v in os.environ.items() if k != "EFT_LOCAL_DEBUG"}
    proc = subprocess.run([str(EFT_LOCAL), "generate", PROMPT, *args], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    # Also no llama.cpp log lines: the C library's stderr is part of the terminal too.
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_subprocess_ctrl_c_at_chat_prompt(tiny):
    """SIGINT while chat waits for input leaves quietly with status 0."""
    env = {k: v for k, v in os.environ.items() if k != "EFT_LOCAL_DEBUG"}
    proc = subprocess.Popen([str(EFT_LOCAL), "chat", *models(tiny), *THREADS], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        seen = b""
        # input() flushes its prompt, so ">>> " shows up once the models are loaded.
        while not seen.endswith(b">>> "):
            byte = os.read(proc.stdout.fileno(), 1)
            assert byte, seen
            seen += byte
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"Traceback" not in out + err
    assert err == b""


# --- chat loop without models --------------------------------------------------------------


class FakeEFT:
    """Replays queued replies; a KeyboardInterrupt class in a reply is raised at that point."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls: list[tuple[list[dict], dict]] = []

    def stream_chat(self, messages, **kw):
        # Copied: the loop appends to the same list after the call.
        self.calls.append(([dict(m) for m in messages], kw))
        pieces = self.replies.pop(0)

        def chunks():
            for i, piece in enumerate(pieces):
                if piece is KeyboardInterrupt:
                    raise KeyboardInterrupt
                if isinstance(piece, Exception):
                    raise piece
                yield Chunk(piece, 100 + i)
            yield Chunk("", None, "stop", {"completion_tokens": len(pieces)})

        return chunks()


def script(*lines):
    """A ``read`` function: returns lines in order, raises exception classes, then EOF."""
    queue = list(lines)
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    read.prompts = prompts
    return read


SAMPLE_KW = {"temperature": 0.0, "max_tokens": 8, "stop": []}


def run_loop(eft, read, system=None):
    """chat_loop with captured output; an escaping Ctrl-C fails the test, not the whole run."""
    out = io.StringIO()
    try:
        conv = chat_loop(eft, SAMPLE_KW, system=system, read=read, out=out)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped chat_loop")
    return conv, out.getvalue()


def test_chat_loop_two_turns():
    eft = FakeEFT(["Hi", " there"], ["Fine"])
    read = script("Hello", "How are you?", "/exit")
    conv, out = run_loop(eft, read, system="Be brief.")
    assert conv == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine"},
    ]
    assert len(eft.calls) == 2
    assert eft.calls[0][0] == conv[:2]
    # The second turn sees the whole first exchange.
    assert eft.calls[1][0] == conv[:4]
    assert all(kw == SAMPLE_KW for _, kw in eft.calls)
    assert read.prompts == [">>> "] * 3
    assert "Hi there\n" in out and "Fine\n" in out


def test_chat_loop_reset_keeps_system():
    eft = FakeEFT(["one"], ["two"])
    conv, out = run_loop(eft, script("first", "/reset", "second", "/exit"), system="sys")
    assert "(conversation cleared)" in out
    assert eft.calls[1][0] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "second"}]
    assert conv == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "two"},
    ]


def test_chat_loop_unknown_command_and_blank_line():
    eft = FakeEFT()
    conv, out = run_loop(eft, script("/foo bar", "   ", "/exit"))
    assert eft.calls == []
    assert conv == []
    assert "unknown command /foo;" in out
    assert "/exit" in out.split("unknown command", 1)[1]


def test_chat_loop_eof_ends_and_ctrl_c_at_prompt_does_not():
    """Ctrl-D at the prompt ends the loop with the conversation so far; Ctrl-C there only says
    how to leave, and the session goes on."""
    eft = FakeEFT(["ok"], ["again"])
    read = script("hi", KeyboardInterrupt, "more", EOFError, "not read")
    conv, out = run_loop(eft, read)
    assert conv == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "more"}, {"role": "assistant", "content": "again"}]
    assert len(eft.calls) == 2
    assert len(read.prompts) == 4
    assert "(to leave, type /exit or press Ctrl-D)" in out
    assert out.endswith("\n")


def test_chat_loop_ctrl_c_during_reply():
    """Ctrl-C mid-reply stops it, keeps the partial text and continues with the next input."""
    eft = FakeEFT(["Hel", "lo", KeyboardInterrupt, " never"], ["again"])
    conv, text = run_loop(eft, script("hi", "more", "/exit"))
    assert "Hello (stopped)\n" in text
    assert "never" not in text
    assert conv[1] == {"role": "assistant", "content": "Hello"}
    assert eft.calls[1][0] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "more"},
    ]
    assert conv[-1] == {"role": "assistant", "content": "again"}


def test_chat_loop_turn_error_keeps_session(capsys):
    """A turn that cannot run (context full) prints one error line and the session goes on."""
    eft = FakeEFT([EFTError("prompt has 300 tokens but the context holds 256")], ["fine"])
    conv, text = run_loop(eft, script("long question", "/reset", "short", "/exit"))
    err = capsys.readouterr().err
    assert err.startswith("error: prompt has 300 tokens") and err.count("\n") == 1
    assert conv == [{"role": "user", "content": "short"}, {"role": "assistant", "content": "fine"}]
    # The failed question was not kept for the next turn.
    assert eft.calls[1][0] == [{"role": "user", "content": "short"}]


def test_per_role_threads_and_gpu_layers(tiny):
    """--threads and --gpu-layers take one number or role=N pairs; unknown roles are errors."""
    def run(threads):
        # Not invoke(): it appends its own --threads.
        return CliRunner().invoke(main, ["generate", "Hello", *models(tiny), "--threads", threads, "-ngl", "0", "-n", "3"])

    ok(run("base=1,tuned=1,reference=1"))
    bad = run("bass=1")
    assert bad.exit_code == 1 and "unknown role 'bass'" in bad.stderr
    assert run("base=x").exit_code == 2


# --- chat with the tiny models -------------------------------------------------------------


def test_chat_command_end_to_end(tiny):
    result = ok(invoke(["chat", *models(tiny), "--temperature", "0", "-n", "8"],
                       input="Hello there\nHow are you?\n/exit\n"))
    assert result.stdout.count(">>> ") == 3
    assert "Traceback" not in result.output
    # The first turn is a single user message, exactly what generate sends for a prompt.
    first = ok(invoke(["generate", "Hello there", *models(tiny), "--temperature", "0", "-n", "8"]))
    assert first.stdout.strip()
    assert ">>> " + first.stdout in result.stdout


def test_chat_reuses_cache_in_second_turn(tiny):
    """Turn 2 only evaluates the tokens after what turn 1 left in the caches."""
    opts = {"temperature": 0, "max_tokens": 8}

    def turn(eft, messages):
        chunks = list(eft.stream_chat(messages, **opts))
        return "".join(c.text for c in chunks), chunks[-1].stats

    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_ctx=512, n_threads=1) as eft:
        messages = [{"role": "user", "content": "Hello there"}]
        reply, stats1 = turn(eft, messages)
        assert stats1["prompt_eval_tokens"] == stats1["prompt_tokens"]
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "How are you?"}]
        _, stats2 = turn(eft, messages)
    assert stats2["prompt_tokens"] > stats1["prompt_tokens"]
    assert 0 < stats2["prompt_eval_tokens"] < stats2["prompt_tokens"]
    # At least the whole first prompt came from the cache.
    assert stats2["prompt_eval_tokens"] <= stats2["prompt_tokens"] - stats1["prompt_tokens"] + 1


# --- option names shared with llama.cpp ----------------------------------------------------


def test_llama_cpp_option_names(tiny):
    """-m/--model is the base model, -t the threads, -n/--n-predict, -ngl/--n-gpu-layers,
    -sys/--system-prompt as in llama.cpp; the long names keep working."""
    long = generate_json(tiny, "--temperature", "0", "--max-tokens", "6", "--gpu-layers", "0", "--threads", "1")
    paths = [str(tiny["base"]), str(tiny["tuned"]), str(tiny["reference"])]
    short = ok(CliRunner().invoke(main, ["generate", PROMPT, "--model", paths[0], "--tuned", paths[1],
                                         "--reference", paths[2], "--temp", "0", "--n-predict", "6",
                                         "--n-gpu-layers", "0", "-t", "1", "--json"]))
    base_long = ok(CliRunner().invoke(main, ["generate", PROMPT, "--base", paths[0], "--tuned", paths[1],
                                             "--reference", paths[2], "--temp", "0", "-n", "6", "-ngl", "0",
                                             "-t", "1", "--json"]))
    assert json.loads(short.stdout)["tokens"] == long["tokens"] == json.loads(base_long.stdout)["tokens"]


@pytest.mark.parametrize("flag", ["-b", "-r"])
def test_short_flags_that_mean_something_else_in_llama_cpp_are_gone(tiny, flag):
    result = CliRunner().invoke(main, ["generate", PROMPT, flag, str(tiny["base"])])
    assert result.exit_code == 2
    assert f"No such option '{flag}'" in result.stderr


def test_threads_short_flag_takes_a_number_not_a_path(tiny):
    result = CliRunner().invoke(main, ["generate", PROMPT, "-t", str(tiny["tuned"])])
    assert result.exit_code == 2
    assert "is not an integer" in result.stderr


def test_recipe_name_given_as_model_says_use_recipe(tiny):
    result = CliRunner().invoke(main, ["generate", PROMPT, "-m", "demo", "--tuned", str(tiny["tuned"]),
                                       "--reference", str(tiny["reference"])])
    assert result.exit_code == 2
    assert result.stderr == ("error: -m/--model takes the base model's GGUF file; for the recipe 'demo' "
                             "use --recipe demo\n")


@pytest.mark.parametrize("value", ["0", "off"])
def test_speculative_zero_or_off_is_plain_decoding(tiny, value):
    plain = generate_json(tiny, *GREEDY)
    off = generate_json(tiny, *GREEDY, "--speculative", value)
    assert off["tokens"] == plain["tokens"]
    assert "acceptance_rate" not in off["stats"]
    assert "acceptance_rate" in generate_json(tiny, *GREEDY, "--speculative", "2")["stats"]
    assert "off" in CliRunner().invoke(main, ["generate", "--help"]).stdout


# --- generate --system -----------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--system", "--system-prompt", "-sys"])
def test_generate_system_message(tiny, flag):
    """--system on generate gives what a chat with that system message gives."""
    system = "Answer in one word."
    obj = generate_json(tiny, *GREEDY, flag, system)
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_ctx=1024, n_threads=1) as eft:
        want = eft.chat([{"role": "system", "content": system}, {"role": "user", "content": PROMPT}],
                        temperature=0, max_tokens=12)
    assert obj["tokens"] == want.tokens
    assert obj["stats"]["prompt_tokens"] > generate_json(tiny, *GREEDY)["stats"]["prompt_tokens"]


def test_chat_takes_system_prompt_alias(tiny):
    result = ok(invoke(["chat", *models(tiny), "--temperature", "0", "-n", "4", "-sys", "Be brief."],
                       input="Hello\n/exit\n"))
    assert result.stdout.count(">>> ") == 2


def test_generate_raw_with_system_is_one_line_error(tiny):
    result = invoke(["generate", PROMPT, *models(tiny), "--raw", "--system", "Be brief."])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --system") and "--raw" in lines[0]


# --- --delta with ':' in paths ----------------------------------------------------------------


@pytest.fixture
def colon_files(tmp_path, monkeypatch):
    """Files whose names hold ':' (legal on POSIX), in the working directory."""
    monkeypatch.chdir(tmp_path)
    for name in ("t.gguf", "r.gguf", "a:b.gguf", "c:d.gguf"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("spec, expected", [
    ("t.gguf:r.gguf", ("t.gguf", "r.gguf", 1.0)),
    ("t.gguf:r.gguf:0.5", ("t.gguf", "r.gguf", 0.5)),
    ("t.gguf:r.gguf:-2", ("t.gguf", "r.gguf", -2.0)),
    ("./a:b.gguf:r.gguf", ("./a:b.gguf", "r.gguf", 1.0)),
    ("a:b.gguf:c:d.gguf:0.7", ("a:b.gguf", "c:d.gguf", 0.7)),
    ("t.gguf:a:b.gguf:3", ("t.gguf", "a:b.gguf", 3.0)),
    # Paths that do not exist here: a ':' after a drive letter belongs to the path.
    (r"C:\models\t.gguf:D:\models\r.gguf", (r"C:\models\t.gguf", r"D:\models\r.gguf", 1.0)),
    ("C:/m/t.gguf:C:/m/r.gguf:0.25", ("C:/m/t.gguf", "C:/m/r.gguf", 0.25)),
    ("missing-t.gguf:missing-r.gguf", ("missing-t.gguf", "missing-r.gguf", 1.0)),
])
def test_parse_delta(colon_files, spec, expected):
    assert parse_delta(spec) == expected


def test_parse_delta_ambiguous_and_malformed(colon_files):
    # Both "a" + "b:r" and "a:b" + "r" name existing files.
    for name in ("a", "b:r", "a:b", "r"):
        (colon_files / name).write_bytes(b"")
    with pytest.raises(EFTError, match=r"'a:b:r' is ambiguous: it reads as 'a' and 'b:r' .* or 'a:b' and 'r'"):
        parse_delta("a:b:r")
    for bad in ("only-one-path", "t.gguf:r.gguf:heavy", "x:y:z:w", ":r.gguf"):
        with pytest.raises(EFTError, match="is not TUNED:REFERENCE"):
            parse_delta(bad)


def test_delta_errors_are_one_line(tiny, colon_files):
    for name in ("a", "b:r", "a:b", "r"):
        (colon_files / name).write_bytes(b"")
    for spec in ("a:b:r", "no-weight:x:heavy"):
        result = CliRunner().invoke(main, ["generate", PROMPT, "-m", str(tiny["base"]), "--delta", spec])
        assert result.exit_code == 2
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: --delta ")


def test_delta_path_with_colon_loads(tiny, tmp_path):
    tuned = tmp_path / "tuned:v2.gguf"
    tuned.write_bytes(Path(tiny["tuned"]).read_bytes())
    via_delta = ok(invoke(["generate", PROMPT, "-m", str(tiny["base"]), "--delta", f"{tuned}:{tiny['reference']}:1",
                           *GREEDY, "--json"]))
    assert json.loads(via_delta.stdout)["tokens"] == generate_json(tiny, *GREEDY)["tokens"]


# --- chat at a terminal ------------------------------------------------------------------------


class Terminal:
    """The controlling side of a pty, read as a stream of expected pieces."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = b""
        self._pos = 0

    def expect(self, wanted: bytes, timeout: float = 60) -> None:
        """Read until ``wanted`` appears after what earlier calls matched."""
        deadline = time.monotonic() + timeout
        while (found := self.seen.find(wanted, self._pos)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, self.seen
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the other side closed
                    chunk = b""
                assert chunk, self.seen
                self.seen += chunk
        self._pos = found + len(wanted)

    def type(self, text: bytes) -> None:
        os.write(self.fd, text)


def test_chat_at_a_terminal_has_line_editing_history_and_ctrl_c(tiny, tmp_path):
    """At a terminal, Ctrl-P recalls the previous line (readline), Ctrl-C at the prompt still
    only prints how to leave, and no history file is written."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "EFT_LOCAL_DEBUG"}
    env.update(HOME=str(home), INPUTRC=os.devnull, TERM="xterm")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([str(EFT_LOCAL), "chat", *models(tiny), *THREADS, "--temp", "0", "-n", "4"],
                            stdin=secondary, stdout=secondary, stderr=secondary, env=env, start_new_session=True)
    os.close(secondary)
    term = Terminal(primary)
    try:
        term.expect(b">>> ")
        term.type(b"/weight 0.5\r")
        term.expect(b"(delta 1 weight 0.5)")
        term.expect(b">>> ")
        term.type(b"\x10\r")  # Ctrl-P: the previous line, sent again
        term.expect(b"(delta 1 weight 0.5)")
        term.expect(b">>> ")
        term.type(b"half a line")
        term.expect(b"half a line")
        # Python's readline loop only notices a signal that interrupts its wait for a key, so
        # the echo must be behind it (a person's Ctrl-C always is).
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        term.expect(LEAVE_HINT.encode())
        term.expect(b">>> ")
        term.type(b"/exit\r")
        assert proc.wait(timeout=30) == 0, term.seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    assert b"Traceback" not in term.seen
    assert list(home.iterdir()) == []
