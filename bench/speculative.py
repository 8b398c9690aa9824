"""Speculative EFT against running the large model alone, measured in one run.

    python bench/speculative.py [--tokens 48] [--cache DIR] [--plot bench/throughput.png]

(a) realistic sizes: random Q4_0 models with SmolLM2-135M and SmolLM2-1.7B shapes and
    SmolLM2's real tokenizer; single models, EFT sequential and concurrent, loop overhead.
(b) controlled acceptance: base = reference + no-op layers (same function, 8x+ the cost), so
    EFT equals the tuned model and greedy acceptance is 100%; speculative K = 2..8 and auto.
(c) the bundled demo triple (models/demo), when present: acceptance and speed-up at each K.

Every row uses the same threads and prompt; models are generated once into the cache
(default ~/.cache/eft-local/bench). Prints markdown tables with ratios measured in this run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import real_models  # noqa: E402
from build import SMOLLM2_1_7B, SMOLLM2_135M, write_random_llama  # noqa: E402

from eft_local import EFT  # noqa: E402

PROMPT = "The history of the old city begins with"
THREADS = os.cpu_count() or 1  # per model; --threads changes it


REPEATS = 3  # each row is the median run of this many


def median_by(runs: list, key) -> object:
    return sorted(runs, key=key)[len(runs) // 2]


def llama_alone(path: Path, tokens: int) -> float:
    """Tokens/s of llama-cpp-python's own greedy loop (Llama.generate), prompt excluded."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    # Timing starts after a few tokens: the prompt and the first pages of the mmapped
    # weights are read before them.
    warm = 4

    def once() -> float:
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True)):
            if i == warm:
                t0 = time.perf_counter()
            if i == warm + tokens:
                return tokens / (time.perf_counter() - t0)
        raise AssertionError("unreachable")

    try:
        return median_by([once() for _ in range(REPEATS)], float)
    finally:
        llm.close()


def eft_run(paths: dict[str, Path], tokens: int, *, speculative=None, concurrent=False) -> dict:
    """Greedy EFT generation of exactly ``tokens`` tokens; returns the stats of the median run."""
    threads = max(1, THREADS // 3) if concurrent else THREADS
    with EFT(paths["base"], paths["tuned"], paths["reference"], concurrent=concurrent, n_ctx=1024,
             n_threads=threads) as eft:
        eft.generate(PROMPT, raw=True, temperature=0, max_tokens=6, ignore_eos=True)  # warm-up, as above
        runs = [eft.generate(PROMPT, raw=True, temperature=0, max_tokens=tokens, ignore_eos=True,
                             speculative=speculative).stats for _ in range(REPEATS)]
        return median_by(runs, lambda st: st["tokens_per_second"])


def build(cache: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    tok = real_models.smollm2()
    cache.mkdir(parents=True, exist_ok=True)

    def get(name, shape, seed, noop=0):
        path = cache / name
        if not path.exists():
            click.echo(f"writing {path}", err=True)
            write_random_llama(path, shape, tok, seed=seed, noop_layers=noop)
        return path

    realistic = {
        "base": get("random-1.7b-q4_0.gguf", SMOLLM2_1_7B, 11),
        "tuned": get("random-135m-a-q4_0.gguf", SMOLLM2_135M, 12),
        "reference": get("random-135m-b-q4_0.gguf", SMOLLM2_135M, 13),
    }
    # 270 no-op layers on a 30-layer model: ~8.5x the reference's decode work.
    controlled = {
        "base": get("random-135m-b-noop270-q4_0.gguf", SMOLLM2_135M, 13, noop=270),
        "tuned": realistic["tuned"],
        "reference": realistic["reference"],
    }
    return realistic, controlled


def section_a(paths: dict[str, Path], tokens: int) -> None:
    click.echo("\n### (a) realistic sizes: SmolLM2-1.7B-shaped base, 135M-shaped tuned and reference (Q4_0)\n")
    alone = {role: llama_alone(p, tokens) for role, p in paths.items()}
    ideal = 1 / sum(1 / v for v in alone.values())
    seq = eft_run(paths, tokens)
    conc = eft_run(paths, tokens, concurrent=True)
    click.echo("| run | tokens/s | vs base alone | vs 1/(t_base+t_tuned+t_reference) | loop overhead share |")
    click.echo("|---|---|---|---|---|")
    for role in ("base", "tuned", "reference"):
        click.echo(f"| {role} alone (llama-cpp-python loop) | {alone[role]:.2f} | {alone[role] / alone['base']:.2f} | | |")
    for label, st in (("EFT sequential", seq), ("EFT concurrent", conc)):
        tps = st["tokens_per_second"]
        overhead = (st["generate_seconds"] - st["forward_seconds"]) / st["generate_seconds"]
        click.echo(f"| {label} | {tps:.2f} | {tps / alone['base']:.2f} | {tps / ideal:.2f} | {overhead:.1%} |")


def section_spec(title: str, paths: dict[str, Path], tokens: int, ks: list) -> list[tuple]:
    click.echo(f"\n### {title}\n")
    base = llama_alone(paths["base"], tokens)
    ref = llama_alone(paths["reference"], tokens)
    plain = eft_run(paths, tokens)["tokens_per_second"]
    click.echo(f"base alone {base:.2f} tokens/s, reference alone {ref:.2f} tokens/s (base costs {ref / base:.1f}x the reference)\n")
    click.echo("| run | tokens/s | vs EFT | vs base alone | acceptance | accepted / round |")
    click.echo("|---|---|---|---|---|---|")
    click.echo(f"| base alone (llama-cpp-python loop) | {base:.2f} | {base / plain:.2f} | 1.00 | | |")
    click.echo(f"| EFT, not speculative | {plain:.2f} | 1.00 | {plain / base:.2f} | | |")
    points = []
    for k in ks:
        st = eft_run(paths, tokens, speculative=k)
        tps = st["tokens_per_second"]
        points.append((k, tps))
        click.echo(f"| speculative K={k} | {tps:.2f} | {tps / plain:.2f} | {tps / base:.2f} | "
                   f"{st['acceptance_rate']:.0%} | {st['accepted_per_round']:.2f} |")
    return [("EFT", plain), ("base", base), *points]


def section_demo(paths: dict[str, Path], ks: list, n_items: int = 40) -> list[tuple]:
    """The demo triple on its held-out questions (chat, greedy, replies end by themselves)."""
    from eft_local import evaluate as ev

    click.echo(f"\n### (c) the demo triple: {n_items} held-out questions, greedy, up to 32 tokens each\n")
    items = ev.load_items(ROOT / "models" / "demo" / "heldout.jsonl")[:n_items]
    models = {k: str(v) for k, v in paths.items()}
    opts = {"n_threads": THREADS}
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
                   f"{r.tokens_per_second / base:.2f} | {r.acceptance_rate:.0f}% | {r.accuracy:.1f} |")
    return [("EFT", plain.tokens_per_second), ("base", base), *points]


def plot(series: dict[str, list[tuple]], path: Path) -> None:
    """Throughput against K, relative to non-speculative EFT, with the base alone for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in series.items():
        ref = dict(points)["EFT"]
        ks = [(k, v / ref) for k, v in points if isinstance(k, int)]
        line = ax.plot([k for k, _ in ks], [v for _, v in ks], marker="o", label=f"{name}: speculative")[0]
        ax.axhline(dict(points)["base"] / ref, color=line.get_color(), linestyle="--", label=f"{name}: base alone")
    ax.axhline(1.0, color="gray", linestyle=":", label="EFT, not speculative")
    ax.set_xlabel("draft length K")
    ax.set_ylabel("tokens/s relative to EFT")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--tokens", default=48, show_default=True, help="Tokens generated per run.")
@click.option("--cache", type=click.Path(path_type=Path), default=Path.home() / ".cache" / "eft-local" / "bench")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG of throughput against K.")
@click.option("--skip", multiple=True, type=click.Choice(["a", "b", "c"]), help="Sections to leave out.")
@click.option("--threads", type=int, default=None, help="Threads per model [default: all cores].")
def main(tokens: int, cache: Path, plot_path: Path | None, skip: tuple[str, ...], threads: int | None) -> None:
    global THREADS
    THREADS = threads or THREADS
    start = time.perf_counter()
    click.echo(f"{THREADS} threads per model, {tokens} tokens per run, median of {REPEATS} runs, greedy, "
               f"prompt {PROMPT!r}")
    realistic, controlled = build(cache)
    series = {}
    if "a" not in skip:
        section_a(realistic, tokens)
    if "b" not in skip:
        series["controlled"] = section_spec(
            "(b) controlled acceptance: base = reference + 270 no-op layers, so EFT = tuned", controlled, tokens,
            [2, 4, 6, 8, "auto"])
    demo = {role: ROOT / "models" / "demo" / f"{role}.gguf" for role in ("base", "tuned", "reference")}
    if "c" not in skip and all(p.exists() for p in demo.values()):
        series["demo"] = section_demo(demo, [2, 4, 6, 8, "auto"])
    if plot_path and series:
        plot(series, plot_path)
    click.echo(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
