"""The habits of llama.cpp's tools: -h, -p, -f, temperature <= 0, and errors as one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

from eft_local.cli import main

PROMPT = "Hello world"
COMMANDS = ["generate", "chat", "explain", "check", "eval", "serve", "pull", "models", "rpc-server"]


def models(tiny) -> list[str]:
    return ["-m", str(tiny["base"]), "--tuned", str(tiny["tuned"]), "--reference", str(tiny["reference"]), "-t", "1"]


def run(args: list[str], input: str | None = None) -> Result:
    return CliRunner().invoke(main, args, input=input, prog_name="eft-local")


def one_line(result: Result, status: int) -> str:
    """The one ``error: ...`` line of a failed command, with its exit status."""
    assert result.exit_code == status, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def tokens(result: Result) -> list[int]:
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)["tokens"]


def test_eft_local_alone_prints_its_help():
    result = run([])
    assert result.exit_code == 0 and result.stdout.startswith("Usage: eft-local")
    assert all(command in result.stdout for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_dash_h_is_help_everywhere(command):
    for flag in ("-h", "--help"):
        result = run([command, flag])
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"Usage: eft-local {command}")


def test_prompt_from_argument_dash_p_dash_f_and_stdin_is_the_same(tiny, tmp_path):
    greedy = [*models(tiny), "--temp", "0", "-n", "8", "--json"]
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT)
    want = tokens(run(["generate", PROMPT, *greedy]))
    assert tokens(run(["generate", "-p", PROMPT, *greedy])) == want
    assert tokens(run(["generate", "--prompt", PROMPT, *greedy])) == want
    assert tokens(run(["generate", "-f", str(path), *greedy])) == want
    assert tokens(run(["generate", "--file", "-", *greedy], input=PROMPT)) == want
    assert len(run(["explain", "-p", PROMPT, *models(tiny), "--temp", "0", "-n", "4", "--json"]).stdout) > 2


def test_two_prompts_are_a_usage_error_and_a_missing_file_an_error(tiny, tmp_path):
    line = one_line(run(["generate", PROMPT, "-p", PROMPT, *models(tiny)]), 2)
    assert "give the prompt once" in line
    line = one_line(run(["generate", "-f", str(tmp_path / "none.txt"), *models(tiny)]), 1)
    assert line == f"error: cannot read {tmp_path / 'none.txt'}: No such file or directory"


def test_temperature_zero_or_below_is_greedy(tiny):
    greedy = tokens(run(["generate", PROMPT, *models(tiny), "--temp", "0", "-n", "10", "--json"]))
    assert tokens(run(["generate", PROMPT, *models(tiny), "--temp", "-1", "-n", "10", "--json"])) == greedy
    assert tokens(run(["generate", PROMPT, *models(tiny), "--temperature", "-0.5", "-n", "10", "--json"])) == greedy


@pytest.mark.parametrize("args, words", [
    (["generate", PROMPT, "--bogus"], "No such option '--bogus'"),
    (["nope"], "No such command 'nope'"),
    (["generate", PROMPT, "-t", "0"], "0 is not from 1 to"),
    (["generate", PROMPT, "-t", "base=100000"], "100000 is not from 1 to"),
    (["generate", PROMPT, "-ngl", "-2"], "-2 is not at least -1"),
    (["generate", PROMPT, "--parallel", "0"], None),
    (["eval"], "Missing argument 'DATA'"),
])
def test_usage_errors_are_one_line_with_status_2(args, words):
    result = run(args)
    if words is None:  # an option the command does not take is a usage error too
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
        return
    assert words in one_line(result, 2)


def test_a_directory_as_a_model_is_one_line_with_status_1(tiny, tmp_path):
    line = one_line(run(["generate", PROMPT, "-m", str(tmp_path), "--tuned", str(tiny["tuned"]),
                         "--reference", str(tiny["reference"])]), 1)
    assert line == f"error: model path is a directory, not a GGUF file: {tmp_path}"


def test_gpu_layers_without_gpu_offload_are_one_warning(tiny):
    from eft_local.runtime.ggml import gpu_devices

    if gpu_devices():
        pytest.skip("this llama.cpp has a GPU: the layers do go there")
    for ngl in ("-1", "base=-1"):
        result = run(["generate", PROMPT, *models(tiny), "--temp", "0", "-n", "4", "-ngl", ngl])
        assert result.exit_code == 0, result.output
        warnings = result.stderr.splitlines()
        assert len(warnings) == 1 and warnings[0].startswith("warning: GPU layers were asked for, but this "
                                                            "llama-cpp-python has no GPU offload")
    assert run(["generate", PROMPT, *models(tiny), "--temp", "0", "-n", "4"]).stderr == ""
