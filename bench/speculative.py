"""Speculative EFT against running the large model alone, measured in one run.

    python bench/speculative.py [--tokens 48] [--cache DIR] [--plot bench/throughput.png]

(a) realistic sizes: random Q4_0 models with SmolLM2-135M and SmolLM2-1.7B shapes and
    SmolLM2's real tokenizer; single models, EFT sequential and concurrent, loop overhead.
(b) controlled acceptance: base = reference + no-op layers (same function, 8x+ the cost), so
    EFT equals the tuned model and greedy acceptance is 100%; speculative K = 2..8 and auto.
    Twice: no-op layers in F32, whose decode is bound by memory traffic as a large model's is on
    a laptop (a batch of 5 costs ~1.5 tokens), and in Q4_0, bound by arithmetic on this kind of
    2-core machine (a batch of 5 costs ~3 tokens). Each table prints that measured batch cost.
(c) the bundled demo triple (models/demo), when present: acceptance and speed-up at each K.

Every row uses the same threads and prompt; models are generated once into the cache
(default ~/.cache/eft-local/bench, 4.5 GB). Rows are interleaved, round by round, and ratios taken
within a round. Prints markdown tables with ratios measured in this run.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack, closing
from pathlib import Path

import click
import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import real_models  # noqa: E402
from build import F32, SMOLLM2_1_7B, SMOLLM2_135M, write_random_llama  # noqa: E402

from eft_local import EFT  # noqa: E402
from eft_local.runtime.context import LocalBackend  # noqa: E402

PROMPT = "The history of the old city begins with"
THREADS = os.cpu_count() or 1  # per model; --threads changes it
GPU_LAYERS = 0  # per model; --gpu-layers changes it (-1: all)


REPEATS = 5  # each row is the median run of this many


def median_by(runs: list, key) -> object:
    return sorted(runs, key=key)[len(runs) // 2]


def median(values: list[float]) -> float:
    return median_by(values, float)


class Alone:
    """llama-cpp-python's own greedy loop (Llama.generate) on one model; a call returns tokens/s."""

    def __init__(self, path: Path, tokens: int):
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=THREADS,
                                   n_threads_batch=THREADS, n_gpu_layers=GPU_LAYERS, verbose=False)
        self.prompt = self.llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
        self.tokens = tokens
        self()  # warm-up: reads the mmapped weights once

    def __call__(self) -> dict:
        # Timing starts after a few tokens, once the prompt is evaluated (prompt excluded).
        warm = 4
        for i, _ in enumerate(self.llm.generate(self.prompt, temp=0.0, reset=True)):
            if i == warm:
                t0 = time.perf_counter()
            if i == warm + self.tokens:
                return {"tokens_per_second": self.tokens / (time.perf_counter() - t0)}
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.llm.close()


def open_eft(paths: dict[str, Path], *, concurrent: bool = False) -> EFT:
    threads = max(1, THREADS // 3) if concurrent else THREADS
    eft = EFT(paths["base"], paths["tuned"], paths["reference"], concurrent=concurrent, n_ctx=1024, n_threads=threads,
              n_gpu_layers=GPU_LAYERS)
    eft.generate(PROMPT, raw=True, temperature=0, max_tokens=6, ignore_eos=True)  # warm-up, as above
    return eft


def eft_runner(eft: EFT, tokens: int, speculative=None):
    """Greedy EFT generation of exactly ``tokens`` tokens; a call returns its stats."""
    return lambda: eft.generate(PROMPT, raw=True, temperature=0, max_tokens=tokens, ignore_eos=True,
                                speculative=speculative).stats


def interleaved(runs: dict[str, object]) -> dict[str, list[dict]]:
    """Run every entry once per round, REPEATS rounds.

    Ratios are then taken within a round: runs minutes apart on a shared machine can differ by
    more than the effects measured, runs seconds apart much less.
    """
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(REPEATS):
        for name, run in runs.items():
            results[name].append(run())
    return results


def tps(results: list[dict]) -> float:
    return median([r["tokens_per_second"] for r in results])


def ratio(results: dict[str, list[dict]], name: str, over: str) -> float:
    """Median over rounds of name's tokens/s over ``over``'s in the same round."""
    return median([a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(results[name], results[over])])


def batch_cost(b: LocalBackend, n: int) -> float:
    """Time of one decode of ``n`` tokens (logits at each) over that of one token, after the prompt."""
    b.sync(b.tokenize(PROMPT))
    start = len(b.tokens)

    def once(k: int) -> float:
        b.trim(start)
        t0 = time.perf_counter()
        b.eval(list(range(100, 100 + k)), n_logits=k)
        return time.perf_counter() - t0

    once(n)  # warm-up: the first decode of a size allocates its buffers
    return median([once(n) / once(1) for _ in range(2 * REPEATS + 1)])


def build(cache: Path) -> tuple[dict[str, Path], dict[str, dict[str, Path]]]:
    tok = real_models.smollm2()
    cache.mkdir(parents=True, exist_ok=True)

    def get(name, shape, seed, noop=0, noop_qtype=None):
        path = cache / name
        if not path.exists():
            click.echo(f"writing {path}", err=True)
            write_random_llama(path, shape, tok, seed=seed, noop_layers=noop, noop_qtype=noop_qtype)
        return path

    realistic = {
        "base": get("random-1.7b-q4_0.gguf", SMOLLM2_1_7B, 11),
        "tuned": get("random-135m-a-q4_0.gguf", SMOLLM2_135M, 12),
        "reference": get("random-135m-b-q4_0.gguf", SMOLLM2_135M, 13),
    }
    small = {"tuned": realistic["tuned"], "reference": realistic["reference"]}
    # The same seed as the reference: its 30 layers are copied exactly, then the no-op layers.
    # 200 F32 no-op layers: ~20x the reference's decode time or more, 2.9 GB of weights a token
    # (as many bytes as a 5B model in Q4_0); 270 Q4_0 layers: ~9x.
    controlled = {
        "F32": {"base": get("random-135m-b-noop200-f32.gguf", SMOLLM2_135M, 13, noop=200, noop_qtype=F32), **small},
        "Q4_0": {"base": get("random-135m-b-noop270-q4_0.gguf", SMOLLM2_135M, 13, noop=270), **small},
    }
    return realistic, controlled


def section_a(paths: dict[str, Path], tokens: int) -> None:
    click.echo("\n### (a) realistic sizes: SmolLM2-1.7B-shaped base, 135M-shaped tuned and reference (Q4_0)\n")
    with ExitStack() as stack:
        runs = {}
        for role, path in paths.items():
            runs[role] = stack.enter_context(closing(Alone(path, tokens)))
        eft = stack.enter_context(open_eft(paths))
        runs["EFT sequential"] = eft_runner(eft, tokens)
        runs["EFT concurrent"] = eft_runner(stack.enter_context(open_eft(paths, concurrent=True)), tokens)
        runs["EFT weight 0"] = lambda: eft.generate(PROMPT, raw=True, temperature=0, max_tokens=tokens,
                                                    ignore_eos=True, weights=[0.0]).stats
        runs["EFT speculative auto"] = eft_runner(eft, tokens, speculative="auto")
        res = interleaved(runs)
    # 1/(t_base + t_tuned + t_reference) from the single-model runs of the same round.
    res["ideal"] = [{"tokens_per_second": 1 / sum(1 / r["tokens_per_second"] for r in rnd)}
                    for rnd in zip(*(res[role] for role in paths))]
    click.echo("| run | tokens/s | vs base alone | vs 1/(t_base+t_tuned+t_reference) | loop overhead share |")
    click.echo("|---|---|---|---|---|")
    for role in paths:
        click.echo(f"| {role} alone (llama-cpp-python loop) | {tps(res[role]):.2f} | {ratio(res, role, 'base'):.2f} | | |")
    for label in ("EFT sequential", "EFT concurrent"):
        overhead = median([(st["generate_seconds"] - st["forward_seconds"]) / st["generate_seconds"] for st in res[label]])
        click.echo(f"| {label} | {tps(res[label]):.2f} | {ratio(res, label, 'base'):.2f} | {ratio(res, label, 'ideal'):.2f} | "
                   f"{overhead:.1%} |")
    # At weight 0 only the base runs; "auto" measures plain steps too and turns drafts off when they do not pay.
    click.echo(f"\n| fast path | tokens/s | vs base alone | vs EFT sequential |\n|---|---|---|---|")
    click.echo(f"| EFT weight 0 | {tps(res['EFT weight 0']):.2f} | {ratio(res, 'EFT weight 0', 'base'):.2f} | "
               f"{ratio(res, 'EFT weight 0', 'EFT sequential'):.2f} |")
    auto = median_by(res["EFT speculative auto"], lambda r: r["tokens_per_second"])
    click.echo(f"| EFT --speculative auto ({auto['plain_steps']} plain steps, {auto['rounds']} draft rounds) | "
               f"{tps(res['EFT speculative auto']):.2f} | {ratio(res, 'EFT speculative auto', 'base'):.2f} | "
               f"{ratio(res, 'EFT speculative auto', 'EFT sequential'):.2f} |")


def section_spec(title: str, paths: dict[str, Path], tokens: int, ks: list) -> list[tuple]:
    click.echo(f"\n### {title}\n")
    with ExitStack() as stack:
        runs = {"base": stack.enter_context(closing(Alone(paths["base"], tokens))),
                "reference": stack.enter_context(closing(Alone(paths["reference"], tokens)))}
        eft = stack.enter_context(open_eft(paths))
        runs["EFT"] = eft_runner(eft, tokens)
        runs.update({k: eft_runner(eft, tokens, speculative=k) for k in ks})
        res = interleaved(runs)
        cost = {role: batch_cost(eft.model_set.by_role[role], 5) for role in ("base", "reference")}
    click.echo(f"base alone {tps(res['base']):.2f} tokens/s, reference alone {tps(res['reference']):.2f} tokens/s "
               f"(base costs {ratio(res, 'reference', 'base'):.1f}x the reference); one decode of 5 tokens costs the "
               f"base {cost['base']:.2f}x one token, the reference {cost['reference']:.2f}x\n")
    click.echo("| run | tokens/s | vs EFT | vs base alone | acceptance | accepted / round |")
    click.echo("|---|---|---|---|---|---|")
    click.echo(f"| base alone (llama-cpp-python loop) | {tps(res['base']):.2f} | {ratio(res, 'base', 'EFT'):.2f} | 1.00 | | |")
    click.echo(f"| EFT, not speculative | {tps(res['EFT']):.2f} | 1.00 | {ratio(res, 'EFT', 'base'):.2f} | | |")
    points = []
    for k in ks:
        st = median_by(res[k], lambda r: r["tokens_per_second"])
        points.append((k, ratio(res, k, "EFT")))
        label = f"K={k}" if k != "auto" else f"auto ({st['plain_steps']} plain steps, {st['rounds']} draft rounds)"
        click.echo(f"| speculative {label} | {tps(res[k]):.2f} | {ratio(res, k, 'EFT'):.2f} | {ratio(res, k, 'base'):.2f} | "
                   f"{st['acceptance_rate']:.0%} | {st['accepted_per_round']:.2f} |")
    return [("EFT", 1.0), ("base", ratio(res, "base", "EFT")), *points]


def section_demo(paths: dict[str, Path], ks: list, n_items: int = 40) -> list[tuple]:
    """The demo triple on its held-out questions (chat, greedy, replies end by themselves)."""
    from eft_local.evaluation import evaluate as ev

    click.echo(f"\n### (c) the demo triple: {n_items} held-out questions, greedy, up to 32 tokens each\n")
    items = ev.load_items(ROOT / "models" / "demo" / "heldout.jsonl")[:n_items]
    models = {k: str(v) for k, v in paths.items()}
    opts = {"n_threads": THREADS, "n_gpu_layers": GPU_LAYERS}
    base = ev.evaluate(ev.parse_config("base", models), items, engine_options=opts).tokens_per_second
    plain = ev.evaluate(ev.parse_config("eft", models), items, engine_options=opts)
    click.echo("| run | tokens/s | vs EFT | vs base alone | acceptance | accuracy % |")
    click.echo("|---|---|---|---|---|---|")
    click.echo(f"| base alone | {base:.0f} | {base / plain.tokens_per_second:.2f} | 1.00 | | |")
    click.echo(f"| EFT, not speculative | {plain.tokens_per_second:.0f} | 1.00 | {plain.tokens_per_second / base:.2f} | | {plain.accuracy:.1f} |")
    points = []
    for k in ks:
        r = ev.evaluate(ev.parse_config("eft", models), items, engine_options=opts, speculative=k)
        points.append((k, r.tokens_per_second))
        click.echo(f"| speculative K={k} | {r.tokens_per_second:.0f} | {r.tokens_per_second / plain.tokens_per_second:.2f} | "
                   f"{r.tokens_per_second / base:.2f} | {'-' if r.acceptance_rate is None else f'{r.acceptance_rate:.0f}%'} | "
                   f"{r.accuracy:.1f} |")
    return [("EFT", plain.tokens_per_second), ("base", base), *points]


def plot(series: dict[str, list[tuple]], path: Path) -> None:
    """Throughput against K, relative to non-speculative EFT, with the base alone for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for name, points in series.items():
        ref = dict(points)["EFT"]
        ks = [(k, v / ref) for k, v in points if isinstance(k, int)]
        line = ax.plot([k for k, _ in ks], [v for _, v in ks], marker="o", label=f"{name}: speculative")[0]
        ax.axhline(dict(points)["base"] / ref, color=line.get_color(), linestyle="--", label=f"{name}: base alone")
    ax.axhline(1.0, color="gray", linestyle=":", label="EFT, not speculative")
    ax.set_xlabel("draft length K")
    ax.set_ylabel("tokens/s relative to EFT")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--tokens", default=48, show_default=True, help="Tokens generated per run.")
@click.option("--cache", type=click.Path(path_type=Path), default=Path.home() / ".cache" / "eft-local" / "bench")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG of throughput against K.")
@click.option("--skip", multiple=True, type=click.Choice(["a", "b", "c"]), help="Sections to leave out.")
@click.option("--threads", type=int, default=None, help="Threads per model [default: all cores].")
@click.option("--gpu-layers", type=int, default=0, show_default=True,
              help="Layers per model offloaded to the GPU (-1: all; needs a GPU build of llama-cpp-python).")
def main(tokens: int, cache: Path, plot_path: Path | None, skip: tuple[str, ...], threads: int | None,
         gpu_layers: int) -> None:
    global THREADS, GPU_LAYERS
    THREADS = threads or THREADS
    GPU_LAYERS = gpu_layers
    start = time.perf_counter()
    click.echo(f"{THREADS} threads per model, {tokens} tokens per run, median of {REPEATS} runs, greedy, "
               f"prompt {PROMPT!r}")
    realistic, controlled = build(cache)
    series = {}
    if "a" not in skip:
        section_a(realistic, tokens)
    if "b" not in skip:
        series["F32 no-op layers"] = section_spec(
            "(b) controlled acceptance: base = reference + 200 no-op layers in F32 (memory-bound), so EFT = tuned",
            controlled["F32"], tokens, [2, 4, 6, 8, "auto"])
        series["Q4_0 no-op layers"] = section_spec(
            "(b') the same with 270 no-op layers in Q4_0 (compute-bound here)",
            controlled["Q4_0"], tokens, [2, 4, 6, 8, "auto"])
    demo = {role: ROOT / "models" / "demo" / f"{role}.gguf" for role in ("base", "tuned", "reference")}
    if "c" not in skip and all(p.exists() for p in demo.values()):
        series["demo"] = section_demo(demo, [2, 4, 6, 8, "auto"])
    if plot_path and series:
        plot(series, plot_path)
    click.echo(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
