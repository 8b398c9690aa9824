"""Context: N sequence slots in one llama.cpp context, checked against single-sequence backends.

Every slot's rows are compared with what ``LocalBackend`` gives for the same tokens alone. Rows of a
batched decode are not bit-identical on F32 models: a batch of several tokens takes another
matrix-multiplication kernel than a single token (differences near 1e-7), and where such a
difference flips the rounding of a value stored in the F16 KV cache, log-probabilities move by up
to a few 1e-3 (with F32 caches the same runs stay within 1e-4, as a test checks). Hence
``ATOL``, which still tells noise from a wrong sequence or position (differences of order 1), and
identical greedy tokens. On the Q4_1 model, whose products are integer dot products, rows are
bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from eft_local import EFTError
from eft_local.runtime.backend import common_prefix
from eft_local.core.combine import log_softmax
from eft_local.runtime.context import Context, Feed, LocalBackend

ROOT = Path(__file__).resolve().parents[1]
DEMO_BASE = ROOT / "models" / "demo" / "base.gguf"
ATOL = 5e-3
STEPS = 20


def slots(backend: LocalBackend, *, n_slots: int, n_ctx: int, n_batch: int | None = None) -> Context:
    """A Context of ``n_slots`` over ``backend``'s model, with its batch size and threads."""
    return Context(backend.model, n_slots=n_slots, n_ctx=n_ctx, n_batch=n_batch or backend.n_batch,
                   n_threads=backend.context.n_threads)


def prompt(seed: int, n: int, n_vocab: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, n_vocab, size=n)]


def alone(backend: LocalBackend, tokens: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation of ``tokens`` by a single-sequence LocalBackend: all tokens and each row."""
    backend.reset()
    backend.eval(tokens)
    tokens, rows = list(tokens), [backend.logits().copy()]
    for _ in range(steps):
        tokens.append(int(np.argmax(rows[-1])))
        backend.eval(tokens[-1:])
        rows.append(backend.logits().copy())
    return tokens, rows


def assert_rows_close(got: list[np.ndarray], want: list[np.ndarray], atol: float = ATOL) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(log_softmax(g), log_softmax(w), atol=atol, rtol=0, err_msg=f"row {i}")


def kv_matches(multi: Context) -> bool:
    """Every slot's KV positions are exactly those of its token list."""
    return all(
        llama_cpp.llama_memory_seq_pos_max(multi.memory, s) == len(multi.tokens[s]) - 1 for s in range(multi.n_slots)
    )


def run_together(multi: Context, prompts: dict[int, list[int]], steps: int):
    """All prompts prefilled in one decode, then one greedy token per slot per step, batched."""
    multi.decode([Feed(s, p, 1) for s, p in prompts.items()])
    rows = {s: [multi.logits(s).copy()] for s in prompts}
    for _ in range(steps):
        feeds = [Feed(s, [int(np.argmax(rows[s][-1]))], 1) for s in prompts]
        before = multi.n_decode_calls
        multi.decode(feeds)
        assert multi.n_decode_calls == before + 1  # one llama_decode for every slot's token
        for s in prompts:
            rows[s].append(multi.logits(s).copy())
    return rows


@pytest.fixture(scope="module", params=["tiny", "demo"])
def model(request, tiny) -> LocalBackend:
    path = tiny["base"] if request.param == "tiny" else DEMO_BASE
    backend = LocalBackend(path, n_ctx=256, n_threads=1)
    yield backend
    backend.close()


@pytest.fixture
def multi(model):
    m = slots(model, n_slots=4, n_ctx=1024)
    yield m
    m.close()


# --- the same rows as one sequence alone ------------------------------------------------------


def test_batched_steps_match_single_sequence_backend(model, multi):
    """Four prompts of different lengths, decoded together: each slot's greedy tokens and rows are
    those of its prompt decoded alone."""
    prompts = {s: prompt(s, n, model.n_vocab) for s, n in enumerate([3, 9, 17, 30])}
    rows = run_together(multi, prompts, STEPS)
    for s, p in prompts.items():
        tokens, want = alone(model, p, STEPS)
        assert multi.tokens[s] == tokens
        assert_rows_close(rows[s], want)
    assert kv_matches(multi)


def test_with_an_f32_cache_batched_rows_are_within_1e_4(model, monkeypatch):
    """The same run with F32 KV caches (here and in a one-slot reference): no F16 rounding to
    flip, so batched rows stay within 1e-4 of the rows alone."""
    default = llama_cpp.llama_context_default_params

    def f32_cache() -> llama_cpp.llama_context_params:
        params = default()
        params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        return params

    monkeypatch.setattr(llama_cpp, "llama_context_default_params", f32_cache)
    try:
        multi = slots(model, n_slots=4, n_ctx=1024)
        single = slots(model, n_slots=1, n_ctx=256)
    finally:
        monkeypatch.undo()
    try:
        prompts = {s: prompt(s, n, model.n_vocab) for s, n in enumerate([3, 9, 17, 30])}
        rows = run_together(multi, prompts, STEPS)
        for s, p in prompts.items():
            single.reset(0)
            want = run_together(single, {0: p}, STEPS)[0]
            assert multi.tokens[s] == single.tokens[0]
            assert_rows_close(rows[s], want, atol=1e-4)
    finally:
        multi.close()
        single.close()


def test_a_slot_decoding_alone_is_bit_identical_to_backend(model, multi):
    """With the same batch shapes as LocalBackend (one slot at a time), rows are bit for bit its own."""
    p = prompt(7, 11, model.n_vocab)
    multi.decode([Feed(0, prompt(8, 5, model.n_vocab), 0)])  # another slot holds tokens meanwhile
    multi.decode([(2, p)])
    tokens, want = alone(model, p, 10)
    for i in range(10):
        assert np.array_equal(multi.logits(2), want[i])
        multi.decode([(2, [tokens[len(p) + i]])])
    assert np.array_equal(multi.logits(2), want[10])


def test_q4_1_rows_are_bit_identical_to_backend(smollm2):
    """Quantized weights: batched one-token rows equal single-sequence rows bit for bit."""
    backend = LocalBackend(smollm2, n_ctx=256, n_threads=1)
    multi = slots(backend, n_slots=4, n_ctx=1024)
    try:
        prompts = {s: prompt(s, n, backend.n_vocab) for s, n in enumerate([4, 9, 2, 13])}
        rows = run_together(multi, prompts, 12)
        for s, p in prompts.items():
            _, want = alone(backend, p, 12)
            assert all(np.array_equal(g, w) for g, w in zip(rows[s], want)), f"slot {s}"
    finally:
        multi.close()
        backend.close()


# --- continuous batching ----------------------------------------------------------------------


def test_slots_join_leave_reset_and_are_reused(model):
    """Requests join and leave between steps; a finished slot is reset and reused, another is
    reused with its old history trimmed by best_slot's prefix. Every request's tokens and rows
    are those it gets alone."""
    multi = slots(model, n_slots=3, n_ctx=768)
    p_shared = prompt(20, 12, model.n_vocab)
    # (step it arrives, prompt, tokens to generate)
    requests = [
        (0, prompt(21, 5, model.n_vocab), 6),
        (0, prompt(22, 14, model.n_vocab), 4),
        (2, p_shared, 6),
        (5, prompt(23, 3, model.n_vocab), 8),
        (9, p_shared[:8] + prompt(24, 4, model.n_vocab), 7),  # shares 8 tokens with request 2
        (11, prompt(25, 7, model.n_vocab), 5),
    ]
    waiting = list(enumerate(requests))
    active: dict[int, int] = {}  # slot -> request
    out: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    free = [0, 1, 2]
    reuse_saved = None
    step = 0
    try:
        while waiting or active:
            feeds = []
            while waiting and waiting[0][1][0] <= step and free:
                r, (_, p, _) = waiting.pop(0)
                slot = multi.best_slot(p, free)
                free.remove(slot)
                keep = min(len(p) - 1, common_prefix(multi.tokens[slot], p))
                if r == 4:
                    reuse_saved = (slot, keep)
                multi.trim(slot, keep)
                feeds.append(Feed(slot, p[keep:], 1))
                active[slot] = r
                out[r] = (list(p), [])
            feeds += [Feed(s, [out[r][0][-1]], 1) for s, r in active.items() if out[r][1]]
            multi.decode(feeds)
            for slot, r in list(active.items()):
                tokens, rows = out[r]
                rows.append(multi.logits(slot).copy())
                if len(rows) > requests[r][2]:
                    del active[slot]
                    free.append(slot)
                    if r == 1:
                        multi.reset(slot)
                        assert multi.tokens[slot] == []
                else:
                    tokens.append(int(np.argmax(rows[-1])))
            assert kv_matches(multi)
            step += 1
    finally:
        multi.close()
    # Request 4 found the slot that held request 2's prompt and kept its 8 shared tokens.
    assert reuse_saved == (2, 8)
    for r, (_, p, n) in enumerate(requests):
        tokens, want = alone(model, p, n)
        assert out[r][0] == tokens, f"request {r}"
        assert_rows_close(out[r][1], want)


def test_trim_of_one_slot_leaves_the_others_intact(model, multi):
    prompts = {s: prompt(30 + s, 10 + 3 * s, model.n_vocab) for s in range(3)}
    run_together(multi, prompts, 5)
    before = [list(t) for t in multi.tokens]
    multi.trim(1, 6)
    assert multi.tokens[1] == before[1][:6]
    assert multi.tokens[0] == before[0] and multi.tokens[2] == before[2]
    assert kv_matches(multi)
    # Each slot goes on from what it holds: the trimmed one from its 6 tokens, the others intact.
    multi.decode([Feed(0, [5], 1), Feed(1, [6, 7], 2), Feed(2, [8], 1)])
    for s, i, held in [(0, -1, multi.tokens[0]), (1, 0, multi.tokens[1][:-1]), (1, 1, multi.tokens[1]),
                       (2, -1, multi.tokens[2])]:
        model.reset()
        model.eval(held)
        assert_rows_close([multi.logits(s, i)], [model.logits()])


def test_best_slot_and_sync_evaluate_only_the_new_tokens(model, multi):
    p = prompt(40, 20, model.n_vocab)
    q = p[:15] + prompt(41, 6, model.n_vocab)
    multi.decode([Feed(0, prompt(42, 9, model.n_vocab), 1), Feed(2, p, 1), Feed(3, q[:4], 0)])
    slot = multi.best_slot(q, [0, 1, 2, 3])
    assert slot == 2
    assert multi.best_slot(q, [1, 0]) == 0  # ties (nothing shared): the lowest id
    assert multi.slot(slot).sync(q) == len(q) - 15
    model.reset()
    model.eval(q)
    assert_rows_close([multi.logits(slot)], [model.logits()])
    # The same tokens again: only the last is evaluated, for its logits.
    assert multi.slot(slot).sync(q) == 1
    assert multi.tokens[slot] == q and kv_matches(multi)


# --- chunks -----------------------------------------------------------------------------------


def test_chunked_prefill_interleaved_with_decoding_gives_the_same_rows(model, multi):
    """A long prompt fed 16 tokens per step (no logits until its last part) while two slots
    generate a token per step: one llama_decode per step, and every row is the one alone."""
    long = prompt(60, 90, model.n_vocab)
    others = {1: prompt(61, 6, model.n_vocab), 3: prompt(62, 11, model.n_vocab)}
    multi.decode([Feed(s, p, 1) for s, p in others.items()])
    rows = {s: [multi.logits(s).copy()] for s in others}
    parts = [long[i : i + 16] for i in range(0, len(long), 16)]
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        feeds = [Feed(0, part, 1 if last else 0)]
        feeds += [Feed(s, [int(np.argmax(rows[s][-1]))], 1) for s in others]
        before = multi.n_decode_calls
        multi.decode(feeds)
        assert multi.n_decode_calls == before + 1
        for s in others:
            rows[s].append(multi.logits(s).copy())
        if not last:
            with pytest.raises(IndexError):
                multi.logits(0)
    long_rows = [multi.logits(0).copy()]
    for _ in range(5):
        multi.decode([Feed(0, [int(np.argmax(long_rows[-1]))], 1)])
        long_rows.append(multi.logits(0).copy())
    for s, p in others.items():
        tokens, want = alone(model, p, len(parts))
        assert multi.tokens[s] == tokens
        assert_rows_close(rows[s], want)
    tokens, want = alone(model, long, 5)
    assert multi.tokens[0] == tokens
    assert_rows_close(long_rows, want)


def test_batches_larger_than_n_batch_are_split(model, monkeypatch):
    """120 tokens over three slots with n_batch 32: four llama_decodes of at most 32 tokens, and
    the rows asked for (two per slot) all come back."""
    sizes = []
    real = llama_cpp.llama_decode

    def spy(ctx, batch):
        if ctx == multi.ctx:
            sizes.append(batch.n_tokens)
        return real(ctx, batch)

    multi = slots(model, n_slots=3, n_ctx=768, n_batch=32)
    try:
        monkeypatch.setattr(llama_cpp, "llama_decode", spy)
        prompts = {s: prompt(70 + s, 40, model.n_vocab) for s in range(3)}
        multi.decode([Feed(s, p, 2) for s, p in prompts.items()])
        assert sizes == [24, 32, 32, 32]
        for s, p in prompts.items():
            model.reset()
            model.eval(p, n_logits=2)
            assert_rows_close([multi.logits(s, 0), multi.logits(s, 1)], [model.logits(0), model.logits(1)])
            assert multi.tokens[s] == p
        with pytest.raises(ValueError, match="rows with logits exceed n_batch"):
            multi.decode([Feed(0, prompt(80, 20, model.n_vocab), 20), Feed(1, prompt(81, 20, model.n_vocab), 20)])
        assert max(sizes) <= 32
    finally:
        multi.close()


# --- sizes and errors -------------------------------------------------------------------------


def test_the_context_is_split_over_the_slots_not_multiplied(tiny):
    backend = LocalBackend(tiny["base"], n_ctx=256, n_threads=1)
    try:
        for n_ctx, n_slots, cells, per_slot in [(1024, 4, 1024, 256), (4096, 8, 4096, 512), (2048, 1, 2048, 1024)]:
            multi = slots(backend, n_slots=n_slots, n_ctx=n_ctx)
            # tiny models are trained on 1024 positions: the last case is capped there
            assert (multi.n_ctx, multi.slot_ctx) == (cells, per_slot), (n_ctx, n_slots)
            multi.close()
    finally:
        backend.close()


def test_a_context_over_a_loaded_model_decodes_and_close_frees_it(tiny):
    backend = LocalBackend(tiny["tuned"], n_ctx=256, n_threads=1)
    multi = Context(backend.model, n_slots=2, n_ctx=512, n_threads=1)
    multi.decode([Feed(0, [5, 6, 7], 1), Feed(1, [8], 1)])
    assert multi.logits(0).shape == multi.logits(1).shape == (backend.n_vocab,)
    assert backend.tokenize("the cat", add_bos=False) and multi.slot_ctx == 256
    multi.close()
    backend.close()
    assert multi.ctx is None and backend.context.ctx is None and backend.model.ptr is None


def test_a_full_slot_raises_one_line_and_changes_nothing(model, multi):
    cap = multi.slot_ctx
    multi.decode([Feed(0, prompt(90, cap - 3, model.n_vocab), 1), Feed(1, [5, 6], 1)])
    before = [list(t) for t in multi.tokens]
    with pytest.raises(EFTError) as e:
        multi.decode([Feed(1, [7], 1), Feed(0, [1, 2, 3, 4], 1)])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"slot 0 full: {cap - 3} + 4 tokens exceed the {cap} a slot holds")
    assert multi.tokens == before and kv_matches(multi)
    multi.decode([Feed(0, [1, 2, 3], 1)])  # exactly full is fine
    assert len(multi.tokens[0]) == cap


def test_trained_length_caps_a_slot():
    """The demo base is trained on 512 positions: a quarter of 4096 is still 512 per slot."""
    backend = LocalBackend(DEMO_BASE, n_ctx=256, n_threads=1)
    multi = slots(backend, n_slots=4, n_ctx=4096)
    try:
        assert (multi.n_ctx, multi.slot_ctx) == (4096, 512)
        with pytest.raises(EFTError, match=r"^slot 0 full: 0 \+ 513 tokens exceed the 512 a slot holds "
                           r"\(the model's trained length\)$"):
            multi.decode([Feed(0, [5] * 513, 1)])
    finally:
        multi.close()
        backend.close()


def test_bad_feeds_are_refused_before_anything_runs(model, multi):
    calls = multi.n_decode_calls
    for feeds, match in [
        ([Feed(4, [1], 1)], "slot must be in"),
        ([Feed(0, [1], 1), Feed(0, [2], 1)], "fed twice"),
        ([Feed(0, [], 0)], "at least one token"),
        ([Feed(0, [1, 2], 3)], "n_logits must be in"),
        ([Feed(0, [model.n_vocab], 1)], "token ids must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            multi.decode(feeds)
    assert multi.n_decode_calls == calls and multi.tokens == [[], [], [], []]


# --- Ctrl-C -----------------------------------------------------------------------------------

INTERRUPTS = textwrap.dedent(
    """
    import json, os, random, signal, sys, threading, time
    import llama_cpp, numpy as np
    from eft_local.runtime.context import Context, Feed, LocalBackend
    path, n = sys.argv[1], int(sys.argv[2])
    backend = LocalBackend(path, n_ctx=256, n_threads=1)
    multi = Context(backend.model, n_slots=4, n_ctx=1024, n_batch=16, n_threads=1)
    rng = random.Random(3)
    def toks(k):
        return [rng.randrange(5, backend.n_vocab) for _ in range(k)]
    def work():
        deadline = time.monotonic() + 2  # a Ctrl-C lost somewhere ends the run, not the test
        while time.monotonic() < deadline:
            op = rng.random()
            slots = rng.sample(range(4), rng.randint(1, 4))
            if op < 0.6:
                feeds = []
                for s in slots:
                    k = rng.choice([1, 1, 2, 7, 40])
                    if len(multi.tokens[s]) + k > multi.slot_ctx:
                        multi.reset(s)
                    feeds.append(Feed(s, toks(k), rng.randint(0, 1)))
                multi.decode(feeds)
            elif op < 0.75:
                multi.trim(slots[0], rng.randint(0, len(multi.tokens[slots[0]])))
            elif op < 0.85:
                multi.slot(slots[0]).sync(multi.tokens[slots[0]][: rng.randint(0, 30)] + toks(rng.randint(1, 20)))
            else:
                multi.reset(slots[0])
    interrupted = bad = 0
    for i in range(n):
        timer = threading.Timer(rng.uniform(0, 0.02), os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            work()
        except KeyboardInterrupt:
            interrupted += 1
        timer.join()
        for s in range(4):
            if llama_cpp.llama_memory_seq_pos_max(multi.memory, s) != len(multi.tokens[s]) - 1:
                bad += 1
    # The caches hold the right values too: each slot's next row is the one of its tokens alone.
    worst = 0.0
    for s in range(4):
        multi.trim(s, 200)
        held = list(multi.tokens[s])
        if not held:
            continue
        multi.decode([Feed(s, [5], 1)])
        backend.reset()
        backend.eval(held + [5])
        a, b = multi.logits(s), backend.logits()
        la, lb = a - np.logaddexp.reduce(a), b - np.logaddexp.reduce(b)
        worst = max(worst, float(np.abs(la - lb).max()))
    print(json.dumps({"interrupted": interrupted, "bad": bad, "worst": worst}))
    """
)


def test_random_ctrl_c_leaves_every_slot_consistent():
    """60 SIGINTs at random moments of decodes, trims, syncs and resets over four slots:
    each slot's KV positions still match its token list, and its cache its tokens."""
    out = subprocess.run(
        [sys.executable, "-c", INTERRUPTS, str(DEMO_BASE), "60"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "EFT_LOCAL_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["interrupted"] == 60
    assert result["bad"] == 0
    assert result["worst"] < ATOL
