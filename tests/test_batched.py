"""Batched decoding (``EFT(parallel=N)``): many requests at once give each what it gets alone.

The demo triple is F32, where llama.cpp's batched rows match one-sequence rows closely enough
for token identity (greedy, and sampled with the same seed).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from eft_local import EFT, EFTError
from eft_local.evaluation import evaluate as ev

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
QUESTIONS = [json.loads(line)["prompt"] for line in (DEMO / "heldout.jsonl").read_text().splitlines()[:12]]


def demo(**kw) -> EFT:
    return EFT(DEMO / "base.gguf", DEMO / "tuned.gguf", DEMO / "reference.gguf", n_threads=1, **kw)


# Requests with different options: greedy, sampled with seeds, weights, stops, limits, filters.
REQUESTS = [
    *[(q, {"temperature": 0}) for q in QUESTIONS[:6]],
    *[(q, {"temperature": 1.0, "seed": i, "top_k": 0, "top_p": 1.0, "min_p": 0.0}) for i, q in enumerate(QUESTIONS[6:10])],
    (QUESTIONS[10], {"temperature": 0, "weights": [0.0], "max_tokens": 20}),
    (QUESTIONS[11], {"temperature": 0, "weights": [2.0], "stop": "is"}),
    (QUESTIONS[0], {"temperature": 0, "plausible_top_p": 0.5, "plausible_model": "base", "max_tokens": 24}),
    (QUESTIONS[1], {"temperature": 0.7, "seed": 3, "ignore_eos": True, "max_tokens": 40}),
]


@pytest.fixture(scope="module")
def alone() -> list[tuple[str, list[int], str]]:
    with demo() as eft:
        out = []
        for q, kw in REQUESTS:
            r = eft.generate(q, **kw)
            out.append((r.text, r.tokens, r.finish_reason))
        return out


def test_concurrent_requests_get_what_each_gets_alone(alone):
    got: dict[int, tuple[str, list[int], str]] = {}

    def one(i: int) -> None:
        q, kw = REQUESTS[i]
        r = eft.generate(q, **kw)
        got[i] = (r.text, r.tokens, r.finish_reason)

    with demo(parallel=4) as eft:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(REQUESTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert [got[i] for i in range(len(REQUESTS))] == alone


def test_requests_queued_at_once_share_steps(alone):
    """All requests queued before any is read: each still gets its own tokens, in far fewer
    decode steps than tokens."""
    from eft_local.engine.results import Completion

    with demo(parallel=4) as eft:
        streams = [eft.stream(q, **kw) for q, kw in REQUESTS]
        got = [Completion.from_chunks(s) for s in streams]
        steps = eft._batcher.steps
    assert [(r.text, r.tokens, r.finish_reason) for r in got] == alone
    assert steps < 0.8 * sum(len(tokens) + 1 for _, tokens, _ in alone)


def test_streams_interleaved_in_one_thread(alone):
    """With slots, several streams of one thread may be read in turns."""
    with demo(parallel=3) as eft:
        streams = [eft.stream(q, **kw) for q, kw in REQUESTS[:3]]
        texts = ["", "", ""]
        live = set(range(3))
        while live:
            for i in sorted(live):
                chunk = next(streams[i])
                texts[i] += chunk.text
                if chunk.finish_reason is not None:
                    live.discard(i)
    assert texts == [text for text, _, _ in alone[:3]]


def test_requests_join_and_leave_between_steps(alone):
    """A long request keeps running while short ones come and go (continuous batching)."""
    with demo(parallel=2) as eft:
        long = eft.stream(QUESTIONS[1], temperature=0.7, seed=3, ignore_eos=True, max_tokens=40)
        pieces = [next(long).text]
        shorts = [eft.generate(q, temperature=0).text for q in QUESTIONS[:4]]
        pieces += [c.text for c in long]
    assert shorts == [text for text, _, _ in alone[:4]]
    assert "".join(pieces) == alone[-1][0]


def test_a_dropped_stream_frees_its_slot(alone):
    with demo(parallel=1 + 1) as eft:
        a = eft.stream(QUESTIONS[1], temperature=0, ignore_eos=True, max_tokens=200)
        b = eft.stream(QUESTIONS[2], temperature=0, ignore_eos=True, max_tokens=200)
        next(a), next(b)
        a.close()
        b.close()
        # Both slots were busy; a new request gets one back.
        assert eft.generate(QUESTIONS[0], temperature=0).text == alone[0][0]


def test_slots_split_the_context_and_close_ends_streams(tiny):
    """--ctx-size is split over the slots (llama.cpp rounds a slot up to 256 cells): a prompt
    the whole context would hold but a slot does not is one clear error."""
    with EFT(tiny["base"], tiny["tuned"], tiny["reference"], n_threads=1, n_ctx=2048, parallel=8) as eft:
        assert eft._batcher.slot_ctx == 256
        with pytest.raises(EFTError, match="a slot holds 256"):
            eft.generate("the cat " * 200)
        s = eft.stream("Hello world", temperature=0, ignore_eos=True, max_tokens=100)
        next(s)
    with pytest.raises(EFTError, match="closed"):
        list(s)


def test_eval_parallel_gives_the_same_results():
    items = ev.load_items(DEMO / "heldout.jsonl")[:40]
    config = ev.parse_config("eft", {"base": str(DEMO / "base.gguf"), "tuned": str(DEMO / "tuned.gguf"),
                                     "reference": str(DEMO / "reference.gguf")})
    one = ev.evaluate(config, items, engine_options={"n_threads": 1})
    eight = ev.evaluate(config, items, engine_options={"n_threads": 1, "parallel": 8})
    assert [i.reply for i in eight.items] == [i.reply for i in one.items]
    assert (eight.format_following, eight.accuracy, eight.mean_tokens) == (one.format_following, one.accuracy,
                                                                           one.mean_tokens)


def test_a_failed_step_ends_its_requests_and_the_batcher_goes_on(alone, monkeypatch):
    from eft_local.runtime.context import Context

    real = Context.decode
    calls = {"n": 0}

    def flaky(self, feeds):
        calls["n"] += 1
        if calls["n"] == 5:
            raise EFTError("llama_decode failed with status -1 in base.gguf")
        return real(self, feeds)

    with demo(parallel=2) as eft:
        monkeypatch.setattr(Context, "decode", flaky)
        with pytest.raises(EFTError, match="llama_decode failed"):
            eft.generate(QUESTIONS[1], temperature=0, ignore_eos=True, max_tokens=30)
        assert eft.generate(QUESTIONS[0], temperature=0).text == alone[0][0]
