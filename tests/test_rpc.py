"""The base model on llama.cpp RPC servers: real servers on 127.0.0.1, started through
``eft-local rpc-server`` in subprocesses, the demo base split across them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from eft_local import EFT, EFTError
from eft_local.runtime import rpc
from eft_local.runtime.context import LocalBackend
from eft_local.cli import main

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
PROMPT = "Where was Patroul born?"
needs_rpc = pytest.mark.skipif(not rpc.rpc_available(), reason="llama-cpp-python built without -DGGML_RPC=on")
CLI = [sys.executable, "-c", "from eft_local.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    """``eft-local rpc-server`` on 127.0.0.1:port, once it answers."""
    proc = subprocess.Popen(CLI + ["rpc-server", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not rpc.reachable(f"127.0.0.1:{port}", timeout=1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"rpc-server did not start: {proc.stderr.read().decode()}")
        time.sleep(0.1)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stderr.close()


class OwnServer:
    """An rpc-server on a port of its own, which a test stops and starts again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = start_server(self.port)

    def start(self) -> None:
        self.proc = start_server(self.port)

    def stop(self) -> None:
        stop_server(self.proc)


@pytest.fixture
def own_server():
    server = OwnServer()
    yield server
    server.stop()  # SIGKILL: ends a stopped (SIGSTOP) server too


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def demo(**kw) -> EFT:
    return EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf", n_threads=1, **kw)


def within(seconds: float, fn, *args, **kwargs):
    """fn's result or exception, failing the test if it takes longer than ``seconds``."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def servers():
    procs = {}
    try:
        for _ in range(2):
            port = free_port()
            procs[f"127.0.0.1:{port}"] = start_server(port)
        yield procs
    finally:
        for proc in procs.values():
            stop_server(proc)


@pytest.fixture(scope="module")
def local_runs():
    """Greedy reference outputs with every model in this process."""
    with demo() as eft:
        return {
            "eft": eft.generate(PROMPT, temperature=0).tokens,
            "base": eft.generate(PROMPT, temperature=0, weights=[0], ignore_eos=True, max_tokens=40).tokens,
        }


# --- on real servers ---------------------------------------------------------------------------

@needs_rpc
def test_split_across_two_servers_matches_local(servers, local_runs):
    endpoints = list(servers)
    before = {e: rss_kib(p.pid) for e, p in servers.items()}
    with demo(rpc=",".join(endpoints)) as eft:
        base = eft.model_set.by_role["base"]
        assert isinstance(base, rpc.RPCBackend)
        # The small models stay in this process.
        assert type(eft.model_set.by_role["tuned"]) is LocalBackend and type(eft.model_set.by_role["reference"]) is LocalBackend
        # llama.cpp put model weights on each server, and each server's memory holds them.
        for e in endpoints:
            assert sum(mib for name, mib in base.placement.items() if f"[{e}]" in name) > 0.5
            assert rss_kib(servers[e].pid) - before[e] > 1024
        assert base.sockets() == 2  # one connection per server, with keepalive
        assert eft.generate(PROMPT, temperature=0).tokens == local_runs["eft"]
        base_only = eft.generate(PROMPT, temperature=0, weights=[0], ignore_eos=True, max_tokens=40)
        assert base_only.tokens == local_runs["base"]
        # Speculative verification reads several logits rows of one decode.
        assert eft.generate(PROMPT, temperature=0, speculative=3).tokens == local_runs["eft"]


@needs_rpc
def test_all_but_output_layer_with_gpu_layers(servers, local_runs):
    endpoint = next(iter(servers))
    with demo(rpc=[endpoint], n_gpu_layers={"base": 2}) as eft:
        placement = eft.model_set.by_role["base"].placement
        assert placement.get("CPU_Mapped", 0) > 1.5  # two of four layers and the output stay here
        assert eft.generate(PROMPT, temperature=0).tokens == local_runs["eft"]


@needs_rpc
def test_cli_generate_on_two_servers(servers):
    result = subprocess.run(CLI + ["generate", "--temperature", "0", "--rpc", ",".join(servers), PROMPT],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Their birthplace is Caltal."


# --- faults ------------------------------------------------------------------------------------

@needs_rpc
def test_unreachable_server_is_one_line_within_seconds():
    endpoint = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(EFTError) as err:
        within(10, demo, rpc=endpoint)
    assert time.monotonic() - t0 < 5
    assert str(err.value) == f"RPC server {endpoint} is unreachable: Connection refused"

    result = subprocess.run(CLI + ["generate", "--rpc", endpoint, PROMPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"error: RPC server {endpoint} is unreachable: Connection refused\n"


@needs_rpc
def test_busy_server_is_one_line_within_seconds(servers, monkeypatch):
    monkeypatch.setattr(rpc.endpoints, "CONNECT_TIMEOUT", 1.0)
    endpoint = next(iter(servers))
    with demo(rpc=endpoint):
        t0 = time.monotonic()
        with pytest.raises(EFTError, match=f"RPC server {endpoint} does not answer within 1 s: it serves one client"):
            within(10, demo, rpc=endpoint)
        assert time.monotonic() - t0 < 4


@needs_rpc
def test_server_killed_mid_generation(local_runs, own_server):
    endpoint = own_server.endpoint
    with demo(rpc=endpoint) as eft:
        chunks = eft.stream(PROMPT, temperature=0, weights=[0], ignore_eos=True, max_tokens=200)

        def read() -> int:
            n = 0
            for _ in chunks:
                n += 1
                if n == 5:
                    own_server.proc.kill()
                    own_server.proc.wait()
            return n

        with pytest.raises(EFTError) as err:
            within(30, read)
        message = str(err.value)
        assert message.startswith(f"RPC server {endpoint} went away while decoding")
        assert "\n" not in message and "next request reconnects" in message
        # The session is usable: it says the server is gone, then reconnects once it is back.
        with pytest.raises(EFTError, match=f"RPC server {endpoint} is unreachable"):
            within(10, eft.generate, PROMPT, temperature=0)
        own_server.start()
        assert within(60, eft.generate, PROMPT, temperature=0).tokens == local_runs["eft"]


@needs_rpc
def test_server_gone_between_requests(local_runs, own_server):
    endpoint = own_server.endpoint
    with demo(rpc=endpoint) as eft:
        assert eft.generate(PROMPT, temperature=0).tokens == local_runs["eft"]
        own_server.stop()
        # Found before any decode: one line, and the same again while it stays away.
        for _ in range(2):
            with pytest.raises(EFTError) as err:
                within(10, eft.generate, PROMPT, temperature=0)
            assert str(err.value) == f"RPC server {endpoint} is unreachable: Connection refused"
        # A server restarted in between costs no error: the next request reconnects.
        own_server.start()
        assert within(60, eft.generate, PROMPT, temperature=0).tokens == local_runs["eft"]
        own_server.stop()
        own_server.start()
        assert within(60, eft.generate, PROMPT, temperature=0).tokens == local_runs["eft"]


@needs_rpc
def test_served_model_answers_503_while_its_server_is_away(local_runs, own_server):
    """Over HTTP a gone RPC server is 503 with Retry-After (the same request may work later), not
    a 400 for a bad request; once the server is back the next request is answered."""
    from fastapi.testclient import TestClient

    from eft_local.server.app import create_app

    endpoint = own_server.endpoint
    body = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0}
    with demo(rpc=endpoint) as eft, TestClient(create_app(eft, model="demo")) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        own_server.stop()
        for stream in (False, True):
            r = within(20, client.post, "/v1/chat/completions", json={**body, "stream": stream})
            if stream:  # the stream has started: the error arrives as an event
                assert r.status_code == 200 and '"code": "unavailable"' in r.text and endpoint in r.text
            else:
                assert r.status_code == 503 and r.headers["retry-after"] == "5"
                error = r.json()["error"]
                assert error["code"] == "unavailable" and error["type"] == "server_error"
                assert error["message"] == f"RPC server {endpoint} is unreachable: Connection refused"
        own_server.start()
        r = within(60, client.post, "/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


@needs_rpc
def test_stuck_server_times_out_and_session_recovers(local_runs, monkeypatch, own_server):
    monkeypatch.setenv(rpc.DECODE_TIMEOUT_ENV, "2")
    pid = own_server.proc.pid
    with demo(rpc=own_server.endpoint) as eft:
        chunks = eft.stream(PROMPT, temperature=0, weights=[0], ignore_eos=True, max_tokens=200)

        def read() -> None:
            for i, _ in enumerate(chunks):
                if i == 3:
                    os.kill(pid, signal.SIGSTOP)  # alive, connected, never answers

        t0 = time.monotonic()
        with pytest.raises(EFTError, match="did not finish decoding within 2 s"):
            within(30, read)
        assert time.monotonic() - t0 < 10
        os.kill(pid, signal.SIGCONT)
        assert within(60, eft.generate, PROMPT, temperature=0).tokens == local_runs["eft"]


# --- the server command ------------------------------------------------------------------------

@needs_rpc
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_rpc_server_stops_on_signal(signum):
    port = free_port()
    server = start_server(port)
    server.send_signal(signum)
    assert server.wait(timeout=5) == 0
    err = server.stderr.read().decode()
    server.stderr.close()
    assert f"on 127.0.0.1:{port}" in err
    assert "no authentication or encryption" in err and "SSH tunnel" in err
    assert "Traceback" not in err


@needs_rpc
def test_rpc_server_port_in_use(servers):
    port = int(next(iter(servers)).rpartition(":")[2])
    result = subprocess.run(CLI + ["rpc-server", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


# --- without servers ---------------------------------------------------------------------------

def test_build_without_rpc_says_how_to_reinstall(monkeypatch):
    monkeypatch.setattr(rpc.build, "rpc_available", lambda: False)
    with pytest.raises(EFTError, match=r"built without RPC; reinstall it with: pip cache remove llama_cpp_python; "
                                       r"CMAKE_ARGS=\"-DGGML_RPC=on\" pip install --force-reinstall"):
        demo(rpc="127.0.0.1:50052")
    result = CliRunner().invoke(main, ["rpc-server"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: this llama-cpp-python was built without RPC")


@pytest.mark.parametrize("spec, message", [
    ("127.0.0.1", "'127.0.0.1' is not HOST:PORT"),
    ("host:0", "'host:0' is not HOST:PORT"),
    ("host:port", "'host:port' is not HOST:PORT"),
    ("a:1,a:1", "a:1 is given twice"),
    ([], "no RPC server given"),
])
def test_bad_endpoints(spec, message):
    with pytest.raises(EFTError, match=message):
        rpc.parse_endpoints(spec)


def test_endpoints_as_string_or_list():
    assert rpc.parse_endpoints(" 10.0.0.2:50052, gpu-box:1 ") == ["10.0.0.2:50052", "gpu-box:1"]
    assert rpc.parse_endpoints(["10.0.0.2:50052"]) == ["10.0.0.2:50052"]


def test_parallel_slots_refuse_rpc():
    with pytest.raises(EFTError, match="parallel slots need the base model in this process"):
        demo(rpc="127.0.0.1:50052", parallel=2)
