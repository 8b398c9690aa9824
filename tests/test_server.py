"""``eft-local serve`` driven by the official openai client, on the bundled demo triple."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from eft_local import EFT

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
EFT_LOCAL = ROOT / ".venv" / "bin" / "eft-local"
QUESTION = "Where was Patroul born?"
QUESTIONS = [json.loads(line)["prompt"] for line in (DEMO / "heldout.jsonl").read_text().splitlines()[:8]]
KEY = "sesame"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An ``eft-local serve`` subprocess on a free port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(EFT_LOCAL), "serve", "--port", str(self.port), "--threads", "1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "EFT_LOCAL_THREADS": "1", **(env or {})},
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        return rc, self.proc.stderr.read().decode()


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--queue", "16", "--parallel", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alone() -> dict[str, str]:
    """Each question's greedy answer from the library, one at a time, and the base model's."""
    with EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf", n_threads=1) as eft:
        out = {q: eft.generate(q, temperature=0).text for q in [QUESTION, *QUESTIONS]}
        out["base"] = eft.generate(QUESTION, temperature=0, weights=[0.0], max_tokens=12).text
        out["raw"] = eft.generate("The favourite food of Dithir is", raw=True, temperature=0, max_tokens=8).text
    return out


def ask(client: openai.OpenAI, question: str, **kw):
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                          temperature=0, **kw)


def test_chat_and_completions_streamed_and_not(server, alone):
    client = server.client()
    reply = ask(client, QUESTION)
    assert reply.choices[0].message.content == alone[QUESTION] == "Their birthplace is Caltal."
    assert reply.choices[0].finish_reason == "stop" and reply.object == "chat.completion"
    assert reply.usage.completion_tokens == 5 and reply.usage.total_tokens == reply.usage.prompt_tokens + 5

    chunks = list(ask(client, QUESTION, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone[QUESTION]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5

    text = client.completions.create(model="demo", prompt="The favourite food of Dithir is", temperature=0,
                                     max_tokens=8)
    assert text.choices[0].text == alone["raw"] and text.object == "text_completion"
    streamed = client.completions.create(model="demo", prompt="The favourite food of Dithir is", temperature=0,
                                         max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == alone["raw"]

    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_logprobs_come_from_the_combined_distribution(server):
    reply = ask(server.client(), QUESTION, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.logprob == pytest.approx(max(a.logprob for a in t.top_logprobs))  # greedy: the top one


def test_weight_zero_gives_the_base_models_answer(server, alone):
    reply = ask(server.client(), QUESTION, max_tokens=12, extra_body={"weight": 0})
    assert reply.choices[0].message.content == alone["base"] != alone[QUESTION]
    again = ask(server.client(), QUESTION, max_completion_tokens=12, extra_body={"weights": [0]})
    assert again.choices[0].message.content == alone["base"]


def test_eight_concurrent_clients_get_their_own_answers(server, alone):
    got: dict[str, str] = {}

    def one(q: str) -> None:
        chunks = ask(server.client(), q, stream=True)
        got[q] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=one, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == {q: alone[q] for q in QUESTIONS}


def test_disconnect_mid_stream_frees_the_model(server, alone):
    # At weight 0 the demo base rambles on: a long reply to leave in the middle of.
    body = {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "max_tokens": 200, "weight": 0, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                break  # one token read, then the client goes away
    start = time.monotonic()
    assert ask(server.client(), QUESTION).choices[0].message.content == alone[QUESTION]
    assert time.monotonic() - start < 10


def test_api_key(server):
    with pytest.raises(openai.AuthenticationError):
        ask(server.client(key="wrong"), QUESTION)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages must be a non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "string content"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400, "n must be 1"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}).encode(), 404, "does not exist"),
    (json.dumps({"messages": [{"role": "user", "content": "hi " * 400}]}).encode(), 400, "context holds"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "weight": 1e308}).encode(), 400, "weight"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, alone, body, status, needle):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"]
    assert ask(server.client(), QUESTION).choices[0].message.content == alone[QUESTION]


def test_body_over_the_limit_is_413(server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}).encode()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=big,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_full_queue_answers_503_then_serves_again(smollm2):
    # SmolLM2 in all three roles (loaded once): slow enough that a long reply is still running.
    model = str(smollm2)
    s = Server("--queue", "0", "-m", model, "--tuned", model, "--reference", model)
    try:
        body = {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Tell a long story."}],
                "stream": True, "max_tokens": 300, "temperature": 0}
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while '"content": ""' in (line := next(lines)) or '"content"' not in line:
                pass  # until the one slot is past its prompt and generating tokens
            busy = httpx.post(f"{s.url}/v1/chat/completions", json=body | {"stream": False}, timeout=30)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "overloaded"
        # The client above left mid-stream: its slot is free again within about a step.
        left = time.monotonic()
        while True:
            with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body | {"max_tokens": 4}, timeout=60) as r:
                if r.status_code != 503:
                    freed = time.monotonic() - left
                    text = [line for line in r.iter_lines() if line.startswith("data: ")]
                    break
            assert time.monotonic() - left < 10, "the slot of the client that left was never freed"
            time.sleep(0.01)
        print(f"slot freed {freed * 1000:.0f} ms after the client left")
        assert r.status_code == 200 and text[-1] == "data: [DONE]"
        assert freed < 1.0
    finally:
        rc, err = s.stop()
    assert rc == 0, err
    assert "Traceback" not in err


def test_sigterm_shuts_down_cleanly():
    s = Server()
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(timeout=30)
    assert rc == 0
    assert "Traceback" not in s.proc.stderr.read().decode()


def test_serve_refuses_a_busy_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([str(EFT_LOCAL), "serve", "--port", str(port)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert out.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}:") and out.stderr.count("\n") == 1
