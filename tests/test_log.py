"""Logging: importing eft-local changes nothing global, llama.cpp's log is routed only while
eft-local runs its own models, -v shows it, and vocabulary notes are one warning each."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_gguf import EOS_ID, IM_END_ID, rewrite_tiny

from eft_local import EFT
from eft_local.cli import main
from eft_local.runtime.log import llama_log_scope, llama_logger

EFT_LOCAL = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "eft-local"
LOADER_LINE = "llama_model_loader: loaded meta data with"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("EFT_LOCAL_DEBUG", raising=False)


def models(tiny, tuned="tuned") -> list[str]:
    return ["-m", str(tiny["base"]), "--tuned", str(tiny[tuned]), "--reference", str(tiny["reference"])]


def run_python(*pieces: str) -> subprocess.CompletedProcess:
    """Run the code in a fresh interpreter; its stderr is captured at the file-descriptor level."""
    env = {k: v for k, v in os.environ.items() if k != "EFT_LOCAL_DEBUG"}
    code = "\n".join(textwrap.dedent(piece) for piece in pieces)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


CURRENT_CALLBACK = """
import ctypes, logging, sys
import llama_cpp

def current():
    callback, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(user_data))
    return ctypes.cast(callback, ctypes.c_void_p).value
"""


def test_import_and_use_change_nothing_global(tiny):
    """Importing eft_local (and its CLI) and running a model leaves llama.cpp's callback, the
    root logger and llama-cpp-python's logger as they were."""
    proc = run_python(CURRENT_CALLBACK, f"""
    before = current()
    root = logging.getLogger()
    state = (list(root.handlers), root.level, logging.getLogger("llama-cpp-python").level)
    import eft_local, eft_local.cli
    assert current() == before, "import installed a callback"
    assert (list(root.handlers), root.level, logging.getLogger("llama-cpp-python").level) == state
    with eft_local.EFT({str(tiny["base"])!r}, {str(tiny["tuned"])!r}, {str(tiny["reference"])!r},
                       n_ctx=256, n_threads=1) as eft:
        eft.generate("Hello", max_tokens=4, temperature=0)
        assert current() == before, "the callback stayed installed after a generation"
    assert current() == before
    assert (list(root.handlers), root.level, logging.getLogger("llama-cpp-python").level) == state
    print("ok")
    """)
    assert proc.stdout.strip() == "ok"
    # eft-local's own loads and decodes print nothing.
    assert proc.stderr == ""


def test_an_eft_never_closed_is_freed_quietly(tiny):
    """An EFT left to the garbage collector (at exit) frees its models inside eft-local's scope:
    llama.cpp's teardown lines do not reach stderr."""
    proc = run_python(f"""
    import eft_local
    eft = eft_local.EFT({str(tiny["base"])!r}, {str(tiny["tuned"])!r}, {str(tiny["reference"])!r},
                        n_ctx=256, n_threads=1)
    print(eft.generate("Hello", max_tokens=4, temperature=0).text != None)
    """)
    assert proc.stdout.strip() == "True"
    assert proc.stderr == ""


def test_a_users_llama_keeps_llama_cpp_pythons_log(tiny):
    """A plain Llama(verbose=True), made while an EFT is open and again after it closed, prints
    llama.cpp's load log to stderr as llama-cpp-python does."""
    proc = run_python(f"""
    import sys
    import llama_cpp
    import eft_local

    def user_llama(marker):
        sys.stderr.write(marker + "\\n")
        sys.stderr.flush()
        llama_cpp.Llama(model_path={str(tiny["tuned"])!r}, n_ctx=64, n_threads=1, verbose=True).close()

    with eft_local.EFT({str(tiny["base"])!r}, {str(tiny["tuned"])!r}, {str(tiny["reference"])!r},
                       n_ctx=256, n_threads=1) as eft:
        eft.generate("Hello", max_tokens=4, temperature=0)
        sys.stderr.write("EFT LOADED\\n")
        user_llama("DURING")
        eft.generate("Hello again", max_tokens=4, temperature=0)
    user_llama("AFTER")
    """)
    before, rest = proc.stderr.split("EFT LOADED\n", 1)
    assert before == ""  # eft-local's loads were quiet
    during, after = rest.split("AFTER\n", 1)
    assert during.startswith("DURING\n")
    assert LOADER_LINE in during and LOADER_LINE in after


def test_scope_restores_the_previous_callback_and_nests():
    proc = run_python(CURRENT_CALLBACK, """
    from eft_local.runtime.log import llama_log_scope, _callback
    ours = ctypes.cast(_callback, ctypes.c_void_p).value
    before = current()
    with llama_log_scope():
        assert current() == ours
        with llama_log_scope():
            assert current() == ours
        assert current() == ours
    assert current() == before
    print("ok")
    """)
    assert proc.stdout.strip() == "ok"


def test_llama_cpp_lines_go_to_the_logger_at_their_level(tiny, caplog):
    """Inside a scope, llama.cpp's messages arrive as whole lines on eft_local.llama_cpp."""
    import llama_cpp

    with caplog.at_level(logging.DEBUG, logger="eft_local"):
        with llama_log_scope():
            params = llama_cpp.llama_model_default_params()
            params.vocab_only = True
            model = llama_cpp.llama_model_load_from_file(os.fsencode(str(tiny["tuned"])), params)
            llama_cpp.llama_model_free(model)
    lines = [r for r in caplog.records if r.name == llama_logger.name]
    assert any(r.getMessage().startswith(LOADER_LINE) for r in lines)
    assert all("\n" not in r.getMessage() and r.getMessage().strip() for r in lines)
    assert {r.levelno for r in lines} <= {logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR}


# --- the command line ------------------------------------------------------------------------


def cli(*args: str, env_debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EFT_LOCAL_DEBUG"}
    if env_debug:
        env["EFT_LOCAL_DEBUG"] = "1"
    return subprocess.run([str(EFT_LOCAL), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("how", ["default", "-v", "--verbose", "EFT_LOCAL_DEBUG"])
def test_verbose_shows_llama_cpp_lines(tiny, how):
    flags = [how] if how.startswith("-") else []
    proc = cli("generate", "Hello", *models(tiny), "-t", "1", "-n", "4", "--temp", "0", *flags,
               env_debug=how == "EFT_LOCAL_DEBUG")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    if how == "default":
        assert proc.stderr == ""
    else:
        lines = proc.stderr.splitlines()
        assert any(line.startswith(f"{LOADER_LINE} ") and str(tiny["base"]) in line for line in lines)
        assert any(line.startswith("llama_context:") for line in lines)


def test_verbose_on_every_command(tiny, tmp_path):
    """-v is accepted by every command; check shows llama.cpp only where it asks llama.cpp."""
    for command in (["check", *models(tiny)], ["models"]):
        result = CliRunner().invoke(main, [*command, "-v"])
        assert result.exit_code == 0, result.output
    for name in ("generate", "chat", "explain", "check", "eval", "serve", "models", "pull"):
        result = CliRunner().invoke(main, [name, "--help"])
        assert "-v, --verbose" in result.stdout, name


def eos_changed(src: Path, dst: Path, eos: int) -> Path:
    """A copy of a GGUF file whose EOS id is ``eos`` (the uint32 value patched in place)."""
    data = bytearray(src.read_bytes())
    key = b"tokenizer.ggml.eos_token_id"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF type uint32
    struct.pack_into("<I", data, at + 4, eos)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def eos_tiny(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny triple with a tuned model that marks <|im_end|> as EOS."""
    tuned = eos_changed(Path(tiny["tuned"]), tmp_path_factory.mktemp("eos") / "tuned-im-end.gguf", IM_END_ID)
    return {**tiny, "tuned": tuned}


EOS_NOTE = f"EOS ids differ (base.gguf: {EOS_ID}, tuned-im-end.gguf: {IM_END_ID})"


def test_vocabulary_note_is_one_warning_line(eos_tiny):
    result = CliRunner().invoke(main, ["generate", "Hello", *models(eos_tiny), "-t", "1", "-n", "4", "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"warning: {EOS_NOTE}; the tuned model's end tokens stop generation"]


def test_vocabulary_note_once_per_command_not_per_load(eos_tiny, tmp_path):
    """eval loads the same models for each configuration; the note is shown once."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hello", "answer": "x"}) + "\n")
    result = CliRunner().invoke(main, ["eval", str(data), *models(eos_tiny), "-t", "1", "-n", "3",
                                       "--config", "eft", "--config", "eft@0.5"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count(EOS_NOTE) == 1


def test_check_reports_notes_on_stdout_only(eos_tiny):
    result = CliRunner().invoke(main, ["check", *models(eos_tiny)])
    assert result.exit_code == 0, result.output
    assert f"note: {EOS_NOTE}" in result.stdout
    assert result.stderr == ""


def test_library_logs_notes_as_warnings(eos_tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="eft_local"):
        with EFT(eos_tiny["base"], eos_tiny["tuned"], eos_tiny["reference"], n_ctx=256, n_threads=1):
            pass
    notes = [r for r in caplog.records if r.name == "eft_local.vocab"]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING
    assert EOS_NOTE in notes[0].getMessage()


def test_load_error_still_carries_llama_cpps_reason(tiny, tmp_path):
    """A file llama.cpp refuses: its reason in the one error line, nothing else on stderr."""
    bad = rewrite_tiny(tiny["tuned"], tmp_path / "arch.gguf", arch="nonsense")
    proc = cli("generate", "Hello", "-m", str(tiny["base"]), "--tuned", str(bad), "--reference",
               str(tiny["reference"]), "-t", "1")
    assert proc.returncode == 1
    assert proc.stderr == f"error: cannot load {bad}: llama.cpp: unknown model architecture: 'nonsense'\n"
