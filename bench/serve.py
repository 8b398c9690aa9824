"""Throughput, latency and memory of ``eft-local serve`` under concurrent streaming clients, in one run.

    .venv/bin/python bench/serve.py [--requests 16] [--max-tokens 32] [--rounds 2] [--smollm2]
                                    [--smollm2-requests 4] [--eval-limit-smollm2 24]
                                    [--realistic] [--no-demo]

For each model set (the bundled demo triple; with ``--smollm2`` also SmolLM2-135M-Instruct Q4_1 from
the test cache in all three roles, loaded once; with ``--realistic`` the random Q4_0 triple of
bench/speculative.py (a), after llama.cpp's own 1-vs-8-sequence decode rate on its base, the
ceiling of what slots can gain) and for N = 1, 2, 4, 8 concurrent clients, a fresh
``eft-local serve --parallel N --threads 1`` subprocess is started on 127.0.0.1 (plus a reference
row: 8 clients against ``--parallel 1``). Each client is a thread with its own openai SDK client
that sends ``--requests`` chat requests in sequence (stream=True, temperature 0, a fixed
max_tokens, stream_options.include_usage), questions taken in order from models/demo/heldout.jsonl
(client i starts at question i*K). Measured per row:

* aggregate completion tokens per second: the sum of the usage chunks' completion_tokens over all
  clients divided by the wall time from the first request to the last reply;
* time to first token (TTFT) p50 / p95: from sending a request to its first chunk with content;
* peak RSS of the server process: VmHWM from /proc/PID/status after the row.

One client against ``eft-local generate``: the same K prompts as the N=1 server row, each through
``eft-local generate --json --temperature 0 -n MAX --threads 1`` (one process per prompt). The
generate rate uses the ``--json`` stats (completion tokens / (prompt_seconds + generate_seconds),
i.e. without process start-up and model load); the server rate is the client-side wall-clock rate
(HTTP and SSE included). Greedy texts are compared too.

Eval: ``eft-local eval models/demo/heldout.jsonl --config eft --threads 1`` with ``--parallel 1`` and
``--parallel 8``, interleaved over ``--rounds`` rounds; medians of the tokens/s column and of the
wall time, their ratio, and whether format-following and accuracy agree across all runs.

Everything uses one thread per model (--threads 1); the machine may be noisy, so treat small
differences as noise. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
EFT = str(ROOT / ".venv" / "bin" / "eft-local")
HELDOUT = ROOT / "models" / "demo" / "heldout.jsonl"
SMOL = Path.home() / ".cache" / "eft-local" / "test-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CLIENTS = (1, 2, 4, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``eft-local serve`` as a subprocess, ready once GET /health answers."""

    def __init__(self, model_args: list[str], parallel: int, queue: int = 64):
        self.port = free_port()
        cmd = [EFT, "serve", *model_args, "--host", "127.0.0.1", "--port", str(self.port),
               "--parallel", str(parallel), "--threads", "1", "--queue", str(queue)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def client_run(url: str, model: str, prompts: list[str], max_tokens: int, out: dict) -> None:
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    tokens, ttfts, texts = 0, [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        first = None
        parts = []
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], stream=True,
            temperature=0, max_tokens=max_tokens, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens
        ttfts.append(first if first is not None else time.perf_counter() - t0)
        texts.append("".join(parts))
    out.update(tokens=tokens, ttfts=ttfts, texts=texts)


def serve_row(model_args: list[str], model: str, questions: list[str], clients: int, parallel: int,
              requests: int, max_tokens: int) -> dict:
    server = Server(model_args, parallel)
    try:
        # one warm-up request so the first timed request does not pay for lazy initialisation
        client_run(server.url, model, questions[:1], max_tokens, {})
        results = [{} for _ in range(clients)]
        threads = [threading.Thread(target=client_run, args=(
            server.url, model, [questions[(i * requests + j) % len(questions)] for j in range(requests)],
            max_tokens, results[i])) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss = vm_hwm_mib(server.proc.pid)
    finally:
        server.stop()
    if any("tokens" not in r for r in results):
        raise RuntimeError("a client failed")
    tokens = sum(r["tokens"] for r in results)
    ttfts = [x for r in results for x in r["ttfts"]]
    return dict(clients=clients, parallel=parallel, requests=clients * requests, tokens=tokens,
                wall=wall, tps=tokens / wall, p50=percentile(ttfts, 50) * 1000,
                p95=percentile(ttfts, 95) * 1000, rss=rss, texts=results[0]["texts"])


def generate_rate(model_args: list[str], prompts: list[str], max_tokens: int) -> dict:
    tokens, seconds, texts = 0, 0.0, []
    t0 = time.perf_counter()
    for prompt in prompts:
        out = subprocess.run([EFT, "generate", *model_args, "--json", "--temperature", "0",
                              "-n", str(max_tokens), "--threads", "1", prompt],
                             capture_output=True, text=True, check=True)
        reply = json.loads(out.stdout)
        tokens += reply["stats"]["completion_tokens"]
        seconds += reply["stats"]["prompt_seconds"] + reply["stats"]["generate_seconds"]
        texts.append(reply["text"])
    return dict(tokens=tokens, seconds=seconds, wall=time.perf_counter() - t0, tps=tokens / seconds,
                texts=texts)


def parse_eval(stdout: str) -> dict:
    """The 'eft' row of eval's markdown table."""
    header = None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "configuration" in cells:
            header = cells
        elif header and cells and cells[0] == "eft":
            return dict(zip(header, cells))
    raise RuntimeError(f"no eft row in eval output:\n{stdout}")


def eval_bench(model_args: list[str], rounds: int, limit: int | None) -> dict:
    runs: dict[int, list[dict]] = {1: [], 8: []}
    for _ in range(rounds):
        for parallel in (1, 8):
            cmd = [EFT, "eval", str(HELDOUT), *model_args, "--config", "eft", "--parallel", str(parallel),
                   "--threads", "1"] + (["--limit", str(limit)] if limit else [])
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = parse_eval(out.stdout)
            row["wall"] = time.perf_counter() - t0
            runs[parallel].append(row)
    return runs


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_set(name: str, model_args: list[str], model: str, requests: int, max_tokens: int,
              rounds: int, eval_limit: int | None) -> None:
    questions = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines() if line.strip()]
    print(f"\n## {name}: {requests} requests per client, max_tokens {max_tokens}, greedy, --threads 1\n",
          flush=True)
    rows = []
    configs = [(n, n) for n in CLIENTS] + [(8, 1)]
    for clients, parallel in configs:
        rows.append(serve_row(model_args, model, questions, clients, parallel, requests, max_tokens))
        print(f"  done: {clients} clients, --parallel {parallel}", file=sys.stderr, flush=True)
    base_tps = rows[0]["tps"]
    print(md_table(
        ["clients", "--parallel", "requests", "completion tokens", "wall s", "tokens/s", "vs 1 client",
         "TTFT p50 ms", "TTFT p95 ms", "server peak RSS MiB"],
        [[r["clients"], r["parallel"], r["requests"], r["tokens"], f"{r['wall']:.2f}", f"{r['tps']:.1f}",
          f"{r['tps'] / base_tps:.2f}x", f"{r['p50']:.1f}", f"{r['p95']:.1f}", f"{r['rss']:.0f}"]
         for r in rows]), flush=True)

    gen = generate_rate(model_args, questions[:requests], max_tokens)
    one = rows[0]
    same = sum(a == b for a, b in zip(one["texts"], gen["texts"]))
    print("\nOne client (server, --parallel 1) vs `eft-local generate` on the same prompts "
          "(generate: --json stats prompt_seconds+generate_seconds, no start-up; server: client wall time)\n")
    print(md_table(
        ["path", "completion tokens", "seconds", "tokens/s", "ratio server/generate", "identical replies"],
        [["server, 1 client", one["tokens"], f"{one['wall']:.3f}", f"{one['tps']:.1f}",
          f"{one['tps'] / gen['tps']:.2f}x", f"{same}/{requests}"],
         ["generate (--json stats)", gen["tokens"], f"{gen['seconds']:.3f}", f"{gen['tps']:.1f}", "1.00x", ""],
         ["generate (process wall, incl. start-up)", gen["tokens"], f"{gen['wall']:.3f}",
          f"{gen['tokens'] / gen['wall']:.1f}", f"{one['tps'] / (gen['tokens'] / gen['wall']):.2f}x", ""]]),
        flush=True)

    runs = eval_bench(model_args, rounds, eval_limit)
    keys = ("format following %", "factual accuracy %", "mean tokens")
    results = {tuple(r.get(k) for k in keys) for rs in runs.values() for r in rs}
    med = {p: (statistics.median(float(r["tokens/s"]) for r in rs), statistics.median(r["wall"] for r in rs))
           for p, rs in runs.items()}
    limit_note = f" --limit {eval_limit}" if eval_limit else ""
    print(f"\n`eft-local eval heldout.jsonl --config eft --threads 1{limit_note}`, {rounds} interleaved rounds, medians\n")
    print(md_table(
        ["--parallel", "tokens/s per round", "median tokens/s", "median wall s", "format %", "accuracy %",
         "mean tokens"],
        [[p, ", ".join(r["tokens/s"] for r in rs), f"{med[p][0]:.1f}", f"{med[p][1]:.2f}",
          rs[0]["format following %"], rs[0]["factual accuracy %"], rs[0]["mean tokens"]]
         for p, rs in runs.items()]))
    print(f"\nratio --parallel 8 / 1: tokens/s {med[8][0] / med[1][0]:.2f}x, wall {med[1][1] / med[8][1]:.2f}x faster; "
          f"format/accuracy/mean tokens identical across all runs: {'yes' if len(results) == 1 else 'NO ' + str(results)}",
          flush=True)


def ceiling(path: Path, slots: int = 8) -> tuple[float, float]:
    """llama.cpp's own aggregate tokens/s for 1 and ``slots`` sequences per decode (bench/multi_decode.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from multi_decode import Context, Feed, LocalBackend, time_steps

    backend = LocalBackend(str(path), n_ctx=256, n_threads=1)
    multi = Context(backend.model, n_batch=backend.n_batch, n_slots=slots, n_ctx=slots * 256, n_threads=1)
    try:
        multi.decode([Feed(s, list(range(100, 132)), 1) for s in range(slots)])
        time_steps(multi, slots, 2, 32)
        one = statistics.median(time_steps(multi, 1, 8, 32) for _ in range(3))
        many = statistics.median(time_steps(multi, slots, 8, 32) for _ in range(3))
        return one, many
    finally:
        multi.close()
        backend.close()


def realistic_set(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT / "tests"))
    from speculative import build

    paths, _ = build(Path.home() / ".cache" / "eft-local" / "bench")
    one, many = ceiling(paths["base"])
    print(f"\n## llama.cpp's own batching on this host ({paths['base'].name}, --threads 1): 1 sequence per decode "
          f"{one:.1f} tokens/s, 8 sequences {many:.1f} tokens/s: {many / one:.2f}x (the ceiling for 8 clients)",
          flush=True)
    model_args = ["--base", str(paths["base"]), "--tuned", str(paths["tuned"]), "--reference", str(paths["reference"])]
    bench_set("realistic triple (1.7B-shaped base, 135M-shaped tuned and reference, random Q4_0)", model_args,
              paths["base"].stem, args.realistic_requests, args.realistic_max_tokens, 1, args.eval_limit_realistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="chat requests per client (demo)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved eval rounds")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M in all three roles")
    parser.add_argument("--smollm2-requests", type=int, default=4)
    parser.add_argument("--eval-limit-smollm2", type=int, default=24, help="eval items for SmolLM2 (0: all)")
    parser.add_argument("--realistic", action="store_true",
                        help="also the realistic triple of bench/speculative.py (a): 1.7B-shaped base, 135M-shaped "
                             "tuned and reference, random Q4_0 weights; with llama.cpp's own batching ceiling")
    parser.add_argument("--realistic-requests", type=int, default=2)
    parser.add_argument("--realistic-max-tokens", type=int, default=32)
    parser.add_argument("--eval-limit-realistic", type=int, default=16, help="eval items for the realistic triple")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo triple")
    args = parser.parse_args()
    t0 = time.perf_counter()
    print(f"host: {os.cpu_count()} CPUs; every model --threads 1")
    if not args.no_demo:
        bench_set("demo triple", [], "demo", args.requests, args.max_tokens, args.rounds, None)
    if args.realistic:
        realistic_set(args)
    if args.smollm2:
        smol = ["--base", str(SMOL), "--tuned", str(SMOL), "--reference", str(SMOL)]
        bench_set("SmolLM2-135M-Instruct Q4_1 in all three roles", smol, SMOL.stem, args.smollm2_requests,
                  32, args.rounds, args.eval_limit_smollm2 or None)
    print(f"\ntotal run time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
