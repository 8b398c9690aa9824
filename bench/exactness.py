"""How exact is speculative EFT on real llama.cpp kernels? Batched vs one-token decodes, measured.

    .venv/bin/python bench/exactness.py [--tokens 8] [--batches 2,3,5] [--gen-tokens 64]
                                        [--ks 2,4] [--prompts 4] [--no-random-f32] [--no-gemma]

Speculative decoding is exact in exact arithmetic: base and reference score the pending token
and the K drafts in ONE batched llama_decode, and that batch is assumed to give the same
log-probabilities as K+1 one-token decodes. llama.cpp's batched kernels may add in a different
order than its one-token kernels, so on real hardware the two can differ. This script measures
by how much, with eft_local.runtime.context.LocalBackend (the library's own decode path), 1 thread.

(a) Per model file: evaluate a prompt (one batch), then the model's own greedy continuation of
    T tokens c_0..c_{T-1} twice on top of it: one token per llama_decode (as plain EFT decodes),
    and as one batch of T with logits at every position (as a verifier decodes the pending token
    and K drafts, T = K+1). Reported over prompts x T rows: max and median |difference| of
    log-softmax over the whole vocabulary, max and median |difference| of the greedy token's
    log-probability, how many rows have a different argmax (with the one-token row's top-1/top-2
    gap there) and the smallest top-1/top-2 gap of any row. Two checks: the same rows decoded in
    batches of 2, 3, 5 (--batches) against the one batch of T (0 = every batch of 2 or more
    gives the same bits, so K does not matter), and a second one-token pass against the first
    (0 = llama.cpp is deterministic here, so any difference comes from the batch).
(b) End to end: greedy EFT (eft_local.EFT, temperature 0, ignore_eos) plain against
    speculative=K, per prompt: the first token position where the sequences differ, or
    "identical". Every model's cache is cleared before each run, so each run evaluates the
    prompt as one batch (a cache kept from a previous run would evaluate the prompt's last
    token alone, which is itself a batch-vs-one-token difference).
    Quantized triples use one file as base (a hard link or copy, so it is a separate model
    verifying in batches) and the same file as tuned = reference (one model, delta exactly 0):
    EFT is then the base alone, drafts come from an identical model, and speculative output
    equals plain output exactly when the base's batched argmax equals its one-token argmax.

Files: SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M (tests/real_models.py fetches them
into ~/.cache/eft-local/test-models), a tiny random F32 llama (tests/tiny_gguf.py, the test
suite's base/tuned/reference), the bundled demo triple (models/demo) and, unless
--no-random-f32, a random-weight F32 model with SmolLM2-135M's shapes and tokenizer
(bench/build.py; written once, 540 MB, into ~/.cache/eft-local/exactness). The tensor-type
column gives each file's weight types by share of parameters (read with gguf.GGUFReader).
Prints markdown tables and the seconds each part took (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("EFT_LOCAL_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import gguf  # noqa: E402
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
import real_models  # noqa: E402
from build import F32, SMOLLM2_135M, write_random_llama  # noqa: E402
from tiny_gguf import write_tiny_llama  # noqa: E402

from eft_local import EFT  # noqa: E402
from eft_local.runtime.context import LocalBackend  # noqa: E402
from eft_local.core.combine import log_softmax  # noqa: E402

CACHE = Path.home() / ".cache" / "eft-local" / "exactness"
DEMO = ROOT / "models" / "demo"
THREADS = 1

# Raw text prompts for (a); every file tokenizes them itself (the tiny vocabulary falls back to
# byte tokens for words it lacks).
RAW_PROMPTS = (
    "The history of the old city begins with",
    "Where was Patroul born? Their birthplace is",
    "Hello world, the capital of France is",
)
# Chat prompts for (b), rendered with the tuned model's chat template.
CHAT_PROMPTS = (
    "Explain rainbows.",
    "Write a short story about a dragon.",
    "What is the capital of France?",
    "List three uses of copper.",
    "Hello world",
    "a cat and a dog",
)
DEMO_PROMPTS = (
    "Where was Patroul born?",
    "What is the favourite food of Dithir?",
    "What does Zhunourin do for a living?",
    "What is the favourite food of Bytemer?",
    "What is the favourite colour of Dithir?",
    "Where was Bytemer born?",
)


def fmt(x: float) -> str:
    """A difference: exactly 0 stays 0, otherwise two significant digits."""
    return "0" if x == 0 else f"{x:.2g}"


def tensor_types(path: Path) -> str:
    """Weight types by share of parameters, e.g. "Q4_1 78%, Q6_K 21%, F32 1%"."""
    counts: Counter = Counter()
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] += int(t.n_elements)
    total = sum(counts.values())
    parts = []
    for name, n in counts.most_common():
        share = 100 * n / total
        parts.append(f"{name} {share:.0f}%" if share >= 0.5 else f"{name} <1%")
    return ", ".join(parts)


def link_or_copy(src: Path, dst: Path) -> Path:
    """A second path to the same bytes that eft_local treats as a different model."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


# --- (a) batched vs one-token decodes ---------------------------------------------------------


def one_token_pass(b: LocalBackend, prompt: list[int], t: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation c_0..c_t, one llama_decode per token; rows[i] predicts c_{i+1}."""
    b.reset()
    b.eval(prompt)
    cont = [int(np.argmax(b.logits()))]
    rows = []
    for _ in range(t):
        b.eval([cont[-1]])
        row = log_softmax(b.logits())
        rows.append(row)
        cont.append(int(np.argmax(row)))
    return cont, np.array(rows)


def batched_pass(b: LocalBackend, prompt: list[int], cont: list[int], t: int, size: int) -> np.ndarray:
    """The same rows from c_0..c_{t-1} decoded in batches of ``size`` with logits at every position."""
    b.reset()
    b.eval(prompt)
    rows = []
    for start in range(0, t, size):
        chunk = cont[start:min(start + size, t)]
        b.eval(chunk, n_logits=len(chunk))
        rows.extend(log_softmax(b.logits(i)) for i in range(len(chunk)))
    return np.array(rows)


def measure_file(path: Path, t: int, sizes: list[int]) -> dict:
    """One-token rows against rows from one batch of ``t``, and batches of ``sizes`` against that batch."""
    b = LocalBackend(path, n_ctx=512, n_threads=THREADS)
    try:
        full, chosen, gaps, flip_gaps = [], [], [], []
        control = between_batches = 0.0
        for text in RAW_PROMPTS:
            prompt = b.tokenize(text)
            cont, one = one_token_pass(b, prompt, t)
            _, again = one_token_pass(b, prompt, t)
            control = max(control, float(np.max(np.abs(again - one))))
            bat = batched_pass(b, prompt, cont, t, t)
            for size in sizes:
                other = batched_pass(b, prompt, cont, t, size)
                between_batches = max(between_batches, float(np.max(np.abs(other - bat))))
            full.append(np.abs(bat - one).ravel())
            idx = np.arange(t)
            chosen.append(np.abs(bat[idx, cont[1:]] - one[idx, cont[1:]]))
            for i in range(t):
                top2 = np.partition(one[i], -2)[-2:]
                gaps.append(float(top2[1] - top2[0]))
                if int(np.argmax(bat[i])) != cont[i + 1]:
                    flip_gaps.append(gaps[-1])
        full_d, chosen_d = np.concatenate(full), np.concatenate(chosen)
        return {
            "n_vocab": b.n_vocab,
            "rows": len(RAW_PROMPTS) * t,
            "max": float(full_d.max()),
            "median": float(np.median(full_d)),
            "chosen_max": float(chosen_d.max()),
            "chosen_median": float(np.median(chosen_d)),
            "flip_gaps": flip_gaps,
            "min_gap": min(gaps),
            "control": control,
            "between_batches": between_batches,
        }
    finally:
        b.close()


def part_a(files: list[tuple[str, Path]], t: int, sizes: list[int]) -> None:
    print(f"## (a) batched vs one-token decodes: {len(RAW_PROMPTS)} prompts x {t} greedy tokens\n")
    print(f"One-token rows against the rows of one batch of {t} (logits at every position). "
          f"|Δ| in nats; \"batches of {','.join(map(str, sizes))}\": the same rows decoded in batches "
          f"of those sizes against one batch of {t}; \"control\": a second one-token pass against the first; "
          f"\"min top-2 gap\": the smallest top-1 minus top-2 log-probability over the one-token rows.\n")
    print("| file | weights | n_vocab | rows | max \\|Δ\\| log-softmax | median \\|Δ\\| log-softmax "
          "| max \\|Δ\\| greedy token logp | median \\|Δ\\| greedy token logp | argmax differs (top-2 gap there) "
          f"| min top-2 gap | batches of {','.join(map(str, sizes))}: max \\|Δ\\| | control |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, path in files:
        r = measure_file(path, t, sizes)
        gaps = ", ".join(fmt(g) for g in r["flip_gaps"][:4]) + (", ..." if len(r["flip_gaps"]) > 4 else "")
        flips = f"{len(r['flip_gaps'])}/{r['rows']}" + (f" ({gaps})" if r["flip_gaps"] else "")
        print(f"| {name} | {tensor_types(path)} | {r['n_vocab']} | {r['rows']} | {fmt(r['max'])} "
              f"| {fmt(r['median'])} | {fmt(r['chosen_max'])} | {fmt(r['chosen_median'])} "
              f"| {flips} | {fmt(r['min_gap'])} | {fmt(r['between_batches'])} | {fmt(r['control'])} |", flush=True)
    print()


# --- (b) end to end ---------------------------------------------------------------------------


def first_difference(a: list[int], b: list[int]) -> int | None:
    """1-based position of the first differing token (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i + 1
    return None if len(a) == len(b) else min(len(a), len(b)) + 1


def run_triple(name: str, triple: dict[str, Path], prompts: tuple[str, ...], n: int, ks: list[int]) -> list[str]:
    rows = []
    with EFT(triple["base"], triple["tuned"], triple["reference"], n_threads=THREADS, n_ctx=512) as eft:
        n_models = len(eft.model_set.backends)
        for prompt in prompts:
            runs = {}
            for k in [None, *ks]:
                for b in eft.model_set.backends:
                    b.reset()
                runs[k] = eft.generate(prompt, temperature=0, max_tokens=n, ignore_eos=True, speculative=k)
            plain = runs[None].tokens
            cells = []
            for k in ks:
                spec = runs[k]
                pos = first_difference(plain, spec.tokens)
                acc = f"acceptance {spec.stats['acceptance_rate']:.0%}"
                cells.append(f"identical for {len(plain)} tokens ({acc})" if pos is None
                             else f"**differs from token {pos}** ({acc})")
            rows.append(f"| {name} ({n_models} models loaded) | {prompt} | " + " | ".join(cells) + " |")
    return rows


def part_b(triples: list[tuple[str, dict[str, Path], tuple[str, ...]]], n: int, ks: list[int]) -> None:
    print(f"## (b) greedy EFT, plain vs speculative: {n} tokens, ignore_eos, chat prompts\n")
    print("| triple | prompt | " + " | ".join(f"speculative={k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    seconds = []
    for name, triple, prompts in triples:
        t0 = time.perf_counter()
        for row in run_triple(name, triple, prompts, n, ks):
            print(row, flush=True)
        seconds.append(f"{name.split(':')[0].split(' (')[0]} {time.perf_counter() - t0:.0f}")
    print("\nseconds per triple: " + "; ".join(seconds) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8, help="(a) greedy tokens per prompt (T)")
    ap.add_argument("--batches", default="2,3,5", help="(a) smaller batch sizes B (K+1 for draft length K) compared with one batch of T")
    ap.add_argument("--gen-tokens", type=int, default=64, help="(b) tokens per generation")
    ap.add_argument("--ks", default="2,4", help="(b) draft lengths K")
    ap.add_argument("--prompts", type=int, default=4, help="(b) prompts per triple")
    ap.add_argument("--no-random-f32", action="store_true",
                    help="skip the random F32 model with SmolLM2-135M shapes (540 MB, written once)")
    ap.add_argument("--no-gemma", action="store_true", help="skip Gemma 3 270M")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batches.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
    t_start = time.perf_counter()

    smol = real_models.smollm2()
    gemma = None if args.no_gemma else real_models.gemma3()
    CACHE.mkdir(parents=True, exist_ok=True)
    random_f32 = None
    if not args.no_random_f32:
        random_f32 = CACHE / "random-smollm2-135m-shape-f32.gguf"
        if not random_f32.exists():
            write_random_llama(random_f32, SMOLLM2_135M, smol, seed=0, qtype=F32)

    with tempfile.TemporaryDirectory(dir=CACHE) as d:
        d = Path(d)
        tiny = {
            "base": write_tiny_llama(d / "tiny-base.gguf", seed=1, n_layer=4, n_embd=128, n_ff=256),
            "tuned": write_tiny_llama(d / "tiny-tuned.gguf", seed=2),
            "reference": write_tiny_llama(d / "tiny-reference.gguf", seed=3),
        }
        files = [("SmolLM2-135M-Instruct.Q4_1.gguf", smol)]
        if gemma:
            files.append(("gemma-3-270m-q4_k_m.gguf", gemma))
        files.append(("tiny F32 (tests/tiny_gguf.py seed 1, 4 layers x 128)", tiny["base"]))
        if random_f32:
            files.append(("random F32, SmolLM2-135M shapes (bench/build.py)", random_f32))
        files += [("models/demo/base.gguf", DEMO / "base.gguf"), ("models/demo/reference.gguf", DEMO / "reference.gguf")]

        print(f"llama-cpp-python {llama_cpp.__version__}, threads per model: {THREADS}, "
              f"{llama_cpp.llama_print_system_info().decode().strip().rstrip('|').strip()}\n")
        t0 = time.perf_counter()
        part_a(files, args.tokens, sizes)
        t1 = time.perf_counter()

        def same_file_triple(path: Path, tag: str) -> dict[str, Path]:
            return {"base": link_or_copy(path, d / f"{tag}-base.gguf"), "tuned": path, "reference": path}

        triples = [("SmolLM2 Q4_1: base = copy, tuned = reference = file",
                    same_file_triple(smol, "smol"), CHAT_PROMPTS[:args.prompts])]
        if gemma:
            triples.append(("Gemma 3 270M Q4_K_M: base = copy, tuned = reference = file",
                            same_file_triple(gemma, "gemma"), CHAT_PROMPTS[:args.prompts]))
        if random_f32:
            triples.append(("random F32 SmolLM2-135M shapes: base = copy, tuned = reference = file",
                            same_file_triple(random_f32, "random"), CHAT_PROMPTS[:args.prompts]))
        triples += [
            ("tiny F32 test triple (base seed 1, tuned 2, reference 3)", tiny, CHAT_PROMPTS[-args.prompts:]),
            ("demo triple (models/demo, the default)",
             {r: DEMO / f"{r}.gguf" for r in ("base", "tuned", "reference")}, DEMO_PROMPTS[:args.prompts]),
        ]
        part_b(triples, args.gen_tokens, ks)
        t2 = time.perf_counter()
    print(f"seconds: (a) {t1 - t0:.0f}, (b) {t2 - t1:.0f}, total with setup {time.perf_counter() - t_start:.0f}")


if __name__ == "__main__":
    main()
