"""Misuse and faults: threads, interleaved streams, Ctrl-C anywhere, bad text and bad numbers.

Each test names the outcome it asserts exactly. The engine runs the bundled demo triple (real
llama.cpp contexts), whose greedy answers to held-out questions are known.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner

from eft_local import EFT, EFTError
from eft_local.cli import main
from eft_local.cli.chat import LEAVE_HINT, chat_loop
from eft_local.core.params import Plausibility
from eft_local.core.interrupts import sigint_deferred

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
EFT_LOCAL = ROOT / ".venv" / "bin" / "eft-local"
QUESTION = "Where was Patroul born?"
ANSWER = "Their birthplace is Caltal."
QUESTIONS = [json.loads(line)["prompt"] for line in (DEMO / "heldout.jsonl").read_text().splitlines()[:6]]


def demo_eft(**kw) -> EFT:
    return EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf", n_threads=1, **kw)


@pytest.fixture(scope="module")
def answers() -> dict[str, str]:
    """Each question's greedy answer, asked alone on a fresh instance."""
    with demo_eft() as eft:
        return {q: eft.generate(q, temperature=0, max_tokens=24).text for q in [QUESTION, *QUESTIONS]}


def cache_matches(eft: EFT) -> bool:
    """Every model's KV cache holds exactly the positions of its token list."""
    for b in eft.model_set.backends:
        top = llama_cpp.llama_memory_seq_pos_max(b.context.memory, b.slot)
        if top != len(b.tokens) - 1:
            return False
    return True


# --- 1. one instance, many callers ----------------------------------------------------------


def test_two_threads_share_one_instance(answers):
    """Two threads x 20 calls on one EFT: every call returns its own question's answer."""
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            q = rng.choice(QUESTIONS)
            try:
                results.append((q, eft.generate(q, temperature=0, max_tokens=24).text))
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    with demo_eft() as eft:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert cache_matches(eft)
    assert errors == []
    assert len(results) == 40
    assert all(text == answers[q] for q, text in results)


def test_threads_with_streams_and_concurrent_mode(answers):
    """Streams read piecewise from two threads, concurrent forward passes: still each its own answer."""
    got: list[tuple[str, str]] = []

    def worker(qs: list[str]) -> None:
        for q in qs:
            got.append((q, "".join(c.text for c in eft.stream(q, temperature=0, max_tokens=24))))

    with demo_eft(concurrent=True) as eft:
        threads = [threading.Thread(target=worker, args=(QUESTIONS[i::2] * 3,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert len(got) == 18
    assert all(text == answers[q] for q, text in got)


def test_interleaved_streams_are_refused_not_mixed(answers):
    """A second call while this thread's stream is unfinished raises EFTError; the first stream
    then finishes with its own answer, and afterwards the second question works."""
    other = QUESTIONS[0]
    with demo_eft() as eft:
        first = eft.stream(QUESTION, temperature=0)
        head = next(first).text
        with pytest.raises(EFTError, match="unfinished stream"):
            eft.stream(other, temperature=0)
        with pytest.raises(EFTError, match="unfinished stream"):
            eft.generate(other, temperature=0)
        assert head + "".join(c.text for c in first) == answers[QUESTION]
        assert eft.generate(other, temperature=0).text == answers[other]
        # A stream dropped halfway lets go of the models once closed.
        abandoned = eft.stream(other, temperature=0)
        next(abandoned)
        abandoned.close()
        assert eft.generate(QUESTION, temperature=0).text == answers[QUESTION]


def test_calls_after_close_raise():
    eft = demo_eft()
    eft.close()
    for call in (lambda: eft.generate(QUESTION), lambda: eft.stream(QUESTION),
                 lambda: eft.next_logprobs([1, 2]), lambda: eft.prompt_tokens(QUESTION),
                 lambda: eft.explain(QUESTION, reply=ANSWER)):
        with pytest.raises(EFTError, match="closed"):
            call()
    eft.close()  # twice is fine


def test_close_during_own_stream_ends_it():
    """close() while this thread's stream is unfinished: the stream ends with EFTError, the
    models are freed, and nothing crashes."""
    eft = demo_eft()
    s = eft.stream(QUESTION, temperature=0, ignore_eos=True, max_tokens=50)
    next(s)
    eft.close()
    with pytest.raises(EFTError, match="closed"):
        list(s)
    assert eft.model_set.backends == []


def test_close_from_another_thread_waits_for_the_generation(answers):
    with demo_eft() as eft:
        s = eft.stream(QUESTION, temperature=0)
        first = next(s).text
        closer = threading.Thread(target=eft.close)
        closer.start()
        time.sleep(0.2)
        assert closer.is_alive()  # waiting for the stream to end
        text = first + "".join(c.text for c in s)
        closer.join(timeout=10)
        assert not closer.is_alive()
    assert text == answers[QUESTION]
    with pytest.raises(EFTError, match="closed"):
        eft.generate(QUESTION)


# --- 2. Ctrl-C ------------------------------------------------------------------------------

API_INTERRUPTS = textwrap.dedent(
    """
    import json, os, random, signal, sys, threading, time
    import llama_cpp
    from eft_local import EFT
    demo, concurrent, n = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
    eft = EFT(f"{demo}/base.gguf", f"{demo}/tuned.gguf", f"{demo}/reference.gguf", n_threads=1,
              concurrent=concurrent)
    rng = random.Random(7)
    q = "Where was Patroul born?"
    expected = eft.generate(q, temperature=0).text
    interrupted = bad = 0
    for i in range(n):
        timer = threading.Timer(rng.uniform(0, 0.02), os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            while True:
                eft.generate(rng.choice([q, "What does Patroul do for a living?"]), temperature=0,
                             max_tokens=rng.randint(1, 40), ignore_eos=True, speculative=rng.choice([None, 2]))
        except KeyboardInterrupt:
            interrupted += 1
        timer.join()
        for b in eft.model_set.backends:
            if llama_cpp.llama_memory_seq_pos_max(b.context.memory, b.slot) != len(b.tokens) - 1:
                bad += 1
    print(json.dumps({"interrupted": interrupted, "bad": bad, "expected": expected,
                      "after": eft.generate(q, temperature=0).text}))
    """
)


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
def test_api_keyboard_interrupts_leave_caches_consistent(concurrent):
    """60 SIGINTs at random moments of generations: every cache still matches its token list."""
    out = subprocess.run(
        [sys.executable, "-c", API_INTERRUPTS, str(DEMO), "1" if concurrent else "0", "60"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "EFT_LOCAL_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["interrupted"] == 60
    assert result["bad"] == 0
    assert result["after"] == result["expected"] == ANSWER


def test_sigint_deferred_holds_ctrl_c_until_the_block_ends():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now, and only recorded the signal
            reached.append(True)
    assert reached == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def chat_session(mode: str, n_signals: int, seed: int) -> tuple[int, str, str]:
    """``eft-local chat`` on the demo with SIGINTs at random moments while questions and commands
    arrive; then /weight 1, /reset, the test question, /exit. Returns (exit status, stdout, stderr)."""
    rng = random.Random(seed)
    proc = subprocess.Popen(
        [str(EFT_LOCAL), "chat", "--temperature", "0", "--threads", "1", "-n", "100", mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EFT_LOCAL_THREADS": "1"},
    )
    out_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: out_chunks.extend(iter(lambda: proc.stdout.read1(4096), b"")))
    reader.start()
    err_chunks: list[bytes] = []
    err_reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))
    err_reader.start()
    deadline = time.monotonic() + 60
    while b"Chatting." not in b"".join(out_chunks):
        assert time.monotonic() < deadline and proc.poll() is None, b"".join(err_chunks)
        time.sleep(0.05)
    # At weight 0 the base rambles on to -n tokens: long replies for Ctrl-C to land in.
    lines = [*QUESTIONS, QUESTION, "/weight 0", "/weight 0", "/weight 1", "/reset", "/delta 1 weight 1", "hello"]
    for i in range(n_signals):
        if i < 3:
            # First, signals that land inside a long reply: the base alone rambles on for
            # 100 tokens, and the signal follows the question closely.
            proc.stdin.write(f"/weight 0\n{QUESTION}\n".encode())
            proc.stdin.flush()
            time.sleep(0.03)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
            continue
        # A line before each signal keeps the session busy, so signals land in replies and
        # commands as well as at the prompt.
        proc.stdin.write((rng.choice(lines) + "\n").encode())
        proc.stdin.flush()
        time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write(f"/weight 1\n/reset\n{QUESTION}\n/exit\n".encode())
    proc.stdin.flush()
    rc = proc.wait(timeout=120)
    reader.join()
    err_reader.join()
    return rc, b"".join(out_chunks).decode(), b"".join(err_chunks).decode()


@pytest.mark.parametrize("mode", ["--sequential", "--concurrent"])
def test_chat_survives_150_random_ctrl_c(mode):
    rc, out, err = chat_session(mode, 150, seed=1 if mode == "--sequential" else 2)
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out
    # The last reply is the answer to the last question.
    last_turn = out.rsplit("(conversation cleared)\n>>> ", 1)[1]
    assert last_turn.startswith(ANSWER + "\n"), last_turn[:200]
    # Signals landed at the prompt and inside replies.
    assert LEAVE_HINT in out and " (stopped)\n" in out
    assert "busy" not in err


def test_ctrl_c_at_the_prompt_prints_how_to_leave():
    """Ctrl-C at the prompt keeps the session and says how to leave; Ctrl-D leaves."""

    class Echo:
        weights = [1.0]

        def stream_chat(self, messages, **kw):
            from eft_local.engine.eft import Chunk

            yield Chunk("ok", 1)

    lines = iter([KeyboardInterrupt, "hi", KeyboardInterrupt, EOFError])

    def read(prompt):
        item = next(lines)
        if isinstance(item, type):
            raise item
        return item

    import io

    out = io.StringIO()
    conv = chat_loop(Echo(), {}, read=read, out=out)
    assert out.getvalue().count(LEAVE_HINT) == 2
    assert conv == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]


# --- 4. input -------------------------------------------------------------------------------


def run_cli(args: list[str], input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(EFT_LOCAL), *args], input=input, capture_output=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "EFT_LOCAL_THREADS": "1"})


def test_undecodable_bytes_in_argv_stdin_and_chat_are_replaced_with_a_warning():
    bad = b"Where was Patroul born?\xff"
    for result in (run_cli(["generate", bad, "--temperature", "0"]),
                   run_cli(["generate", "--temperature", "0"], input=bad)):
        assert result.returncode == 0, result.stderr
        assert result.stderr.decode().count("warning: the input held bytes that are not UTF-8") == 1
        assert result.stdout.decode().strip()
    chat = run_cli(["chat", "--temperature", "0"], input=b"hello \xfe\xff\n" + QUESTION.encode() + b"\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert b"warning: the input held bytes that are not UTF-8" in chat.stderr
    assert ANSWER.encode() in chat.stdout
    assert b"Traceback" not in chat.stderr


def test_library_refuses_lone_surrogates():
    with demo_eft() as eft:
        with pytest.raises(EFTError, match="not valid text"):
            eft.generate("Where\udcff was Patroul born?")
        with pytest.raises(EFTError, match="not valid text"):
            eft.generate(QUESTION, stop=["\udcff"])


def test_stop_accepts_one_string(answers):
    with demo_eft() as eft:
        reply = eft.generate(QUESTION, temperature=0, stop="Caltal")
        assert reply.text == "Their birthplace is " and reply.finish_reason == "stop"
        assert eft.generate(QUESTION, temperature=0, stop=None).text == answers[QUESTION]
        with pytest.raises(EFTError, match="stop must be a string or a list of strings"):
            eft.generate(QUESTION, stop=5)


@pytest.mark.parametrize("threads", ["0", "-3", "100000"])
def test_threads_out_of_range_are_one_line_usage_errors(threads):
    result = run_cli(["generate", QUESTION, "--threads", threads, "-n", "2"])
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.startswith("error: Invalid value for '--threads' / '-t': ") and err.count("\n") == 1
    assert f"{threads} is not from 1 to " in err


def test_bad_seeds_and_weights_are_one_line_errors():
    for args, message in ((["--seed", "-2"], "error: seed must be a non-negative integer"),
                          (["--weight", "1e308"], "error: weight must be a number from -100 to 100"),
                          (["--weight", "nan"], "error: weight must be a number from -100 to 100")):
        result = run_cli(["generate", QUESTION, "-n", "2", *args])
        err = result.stderr.decode()
        assert result.returncode == 1 and err.startswith(message) and err.count("\n") == 1, err
        assert result.stdout == b""
    # -1 is a random seed, as in llama.cpp.
    assert run_cli(["generate", QUESTION, "-n", "2", "--seed", "-1"]).returncode == 0
    with demo_eft() as eft:
        with pytest.raises(EFTError, match="weight must be"):
            eft.set_weights([101])
        with pytest.raises(EFTError, match="seed must be"):
            eft.generate(QUESTION, seed=1.5)


# --- 6. explain uses the engine's combination -----------------------------------------------


def test_explain_reply_is_tokenized_as_the_continuation():
    """--reply scores 'Their' (what the model generates), not ' Their' (the reply tokenized alone)."""
    with demo_eft() as eft:
        generated = eft.explain(QUESTION, temperature=0)
        scored = eft.explain(QUESTION, reply=ANSWER)
    assert [r.token for r in scored] == [r.token for r in generated]
    assert scored[0].text == "Their" and scored[0].combined_prob > 0.9


def test_explain_columns_are_the_sampled_distribution_with_plausibility():
    """With a plausibility filter, p(EFT) is the filtered distribution the engine samples from:
    tokens outside the filter get probability 0 (null in JSON), kept ones are renormalised."""
    with demo_eft() as eft:
        kw = dict(plausible_top_p=0.3, plausible_model="base")
        rows = eft.explain(QUESTION, reply="Their favourite birthplace", **kw)
        plain = eft.explain(QUESTION, reply="Their favourite birthplace")
        tokens = eft.prompt_tokens(QUESTION)["tuned"]
        mix = eft.model_set.mix(None, Plausibility(0.3, 0.0, "base"))
        for i, row in enumerate(rows):
            with eft._guard.take():
                eft.model_set.run(lambda b: b.sync(tokens + [r.token for r in rows[:i]]))
                expected = eft.model_set.combined(mix)
            assert row.combined_logprob == pytest.approx(expected[row.token], abs=1e-9) or (
                row.combined_logprob == -np.inf and expected[row.token] == -np.inf)
    ruled_out = [r for r in rows if r.combined_prob == 0.0]
    assert ruled_out, [r.combined_prob for r in rows]
    assert all(p.combined_prob > 0 for p in plain)
    assert ruled_out[0].to_dict()["combined_logprob"] is None
    json.dumps([r.to_dict() for r in rows], allow_nan=False)  # valid JSON, no Infinity/NaN


def test_explain_cli_reply_applies_the_plausibility_filter():
    """--reply with --plausible-top-p: the p(EFT) column is the filtered distribution."""
    args = ["explain", QUESTION, "--reply", "Their favourite birthplace", "--json", "--threads", "1"]
    plain = json.loads(run_cli(args).stdout)
    filtered = json.loads(run_cli([*args, "--plausible-top-p", "0.3", "--plausible-model", "base"]).stdout)
    assert [r["token"] for r in plain] == [r["token"] for r in filtered]
    assert all(r["combined_prob"] > 0 for r in plain)
    assert any(r["combined_prob"] == 0 and r["combined_logprob"] is None for r in filtered)


def test_explain_ruled_out_tokens_match_generation(monkeypatch):
    """A token the reference rules out (-inf): explain shows it ruled out (term and combined
    -inf, probability 0), as the combination generation samples from does, never inf or NaN."""
    import eft_local.engine.explain as explain_module

    real_rows = explain_module._rows

    def rows_with_a_hole(model, prompt, reply):
        rows = real_rows(model, prompt, reply)
        if model is eft.model_set.by_role["reference"]:
            rows[0] = rows[0].copy()
            rows[0][reply[0]] = -np.inf
        return rows

    with demo_eft() as eft:
        monkeypatch.setattr(explain_module, "_rows", rows_with_a_hole)
        row = eft.explain(QUESTION, reply=ANSWER)[0]
        monkeypatch.undo()
        assert row.logprobs["reference"] == -np.inf
        assert row.delta_terms == [-np.inf]
        assert row.combined_prob == 0.0 and row.combined_logprob == -np.inf
        d = row.to_dict()
        assert d["combined_logprob"] is None and d["delta_terms"] == [None] and d["combined_prob"] == 0.0
        json.dumps(d, allow_nan=False)


# --- 3. files -------------------------------------------------------------------------------


def test_check_refuses_fifo_and_truncated_files(tmp_path):
    """`check` (and so every command) refuses a FIFO without hanging and a cut file with its sizes."""
    fifo = tmp_path / "base.gguf"
    os.mkfifo(fifo)
    data = (DEMO / "base.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    for path, message in ((fifo, f"error: not a regular file: {fifo}\n"),
                          (cut, f"error: {cut}: truncated: has {len(data) // 2} bytes, header describes {len(data)}\n")):
        result = run_cli(["check", "-m", str(path), "--tuned", str(DEMO / "tuned.gguf"), "--reference", str(DEMO / "reference.gguf")])
        assert result.returncode == 1
        assert result.stderr.decode() == message


# --- 8. the context error says when the cap is the trained length ---------------------------


def test_context_error_names_the_trained_length():
    with demo_eft() as eft:
        with pytest.raises(EFTError) as e:
            eft.generate("Where was Patroul born? " * 160)
    assert "trained length" in str(e.value) and "no option raises" in str(e.value)
    assert "raise --ctx-size" not in str(e.value)
