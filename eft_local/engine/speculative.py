"""Exact speculative EFT decoding: the small tuned model drafts, the other models verify.

Per round: the tuned model drafts k tokens from its own sampler-transformed distribution q;
base and reference evaluate the pending token and the k drafts in one batch each, which gives
the EFT target p at every drafted position. Draft x_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); the first rejection samples from normalise(max(p_i - q_i, 0)); when
all k are accepted a bonus token comes from p_{k+1}. The output distribution is exactly that of
plain EFT sampling in exact arithmetic (Leviathan et al. 2023, Chen et al. 2023). In floating point
the verifiers' batched logits differ slightly from one-token decodes: on F32 models greedy output
has matched plain decoding token for token, on quantized ones it can part ways (README, "What
exactness holds"; bench/exactness.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..core.combine import log_softmax
from ..core.params import MAX_DRAFT
from ..core.sampling import Sampler, draw, plausible

if TYPE_CHECKING:
    from .model_set import Mix, ModelSet



@dataclass
class SpecStats:
    """Counters of one generation: acceptance and where the time went."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    plain_steps: int = 0  # steps without drafts (``auto`` found they did not pay)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    combine_seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
            "accepted_per_round": round(self.accepted / self.rounds, 3) if self.rounds else 0.0,
            "rounds": self.rounds,
            "plain_steps": self.plain_steps,
            "mean_draft_length": round(self.drafted / self.rounds, 2) if self.rounds else 0.0,
            "draft_seconds": round(self.draft_seconds, 4),
            "verify_seconds": round(self.verify_seconds, 4),
            "combine_sample_seconds": round(self.combine_seconds, 4),
        }


class DraftTuner:
    """``--speculative auto``: pick the draft length with the lowest measured time per token.

    k = 0 is a plain step (no drafts), measured first, so speculation turns itself off when no
    draft length pays. Each round's seconds per emitted token updates an average for its k; the
    tuner tries the untried neighbours of the best k, then settles on the best, and every
    ``PROBE`` rounds measures the best's neighbour again (acceptance changes along a reply).
    Cost is measured rather than modelled because it depends on the machine (how much a batch
    of k costs the large model) and on how well the tuned model predicts this reply.
    """

    PROBE = 16

    def __init__(self, k: int = 4):
        self.k = 0
        self.start = k
        self.cost: dict[int, float] = {}
        self.rounds = 0

    def update(self, seconds: float, emitted: int) -> int:
        """Record a round of the current k; return the k for the next round."""
        c = seconds / max(emitted, 1)
        self.cost[self.k] = c if self.k not in self.cost else 0.7 * self.cost[self.k] + 0.3 * c
        self.rounds += 1
        if self.start not in self.cost:
            self.k = self.start
            return self.k
        best = min(self.cost, key=self.cost.__getitem__)
        near = [n for n in (best + 1, best - 1) if 0 <= n <= MAX_DRAFT]
        untried = [n for n in near if n not in self.cost]
        if untried:
            self.k = untried[0]
        elif self.rounds % self.PROBE == 0:
            self.k = near[(self.rounds // self.PROBE) % len(near)]
        else:
            self.k = best
        return self.k


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Log of normalise(max(p - q, 0)): where to sample after a rejection."""
    diff = np.maximum(np.exp(p) - np.exp(q), 0.0)
    if not diff.any():
        # Only reachable through rounding when p == q, where a rejection has probability 0.
        return p
    with np.errstate(divide="ignore"):
        return log_softmax(np.log(diff))


def speculative_tokens(model_set: "ModelSet", sampler: Sampler, rng: np.random.Generator, k: int | None,
                       mix: "Mix", stats: SpecStats) -> Iterator[int]:
    """Yield EFT tokens after a prefill, drafting ``k`` at a time (None: adapt k, 0 included).

    Every model's cache is rolled back to the accepted prefix after each round.
    """
    tuner = None
    if k is None:
        # One tuner per model set: what a draft length costs on this machine carries over from
        # one call to the next, so short replies do not each pay for the search.
        tuner = model_set.draft_tuner = model_set.draft_tuner or DraftTuner()
        k = tuner.k
    drafter = model_set.by_role["tuned"]
    plaus = mix.plausibility
    filter_drafts = plaus.active and plaus.model == "tuned"
    verifiers = [b for b in model_set.backends if b is not drafter]
    n = model_set.n_shared

    t = time.perf_counter()
    token = sampler.sample(model_set.combined(mix), rng)
    stats.combine_seconds += time.perf_counter() - t
    yield token
    while True:
        # Room for the pending token, k drafts and a bonus in every context.
        room = min(b.n_ctx - len(b.tokens) for b in model_set.backends) - 2
        if room < 0:
            return
        kk = max(0, min(k, room, MAX_DRAFT))
        if kk == 0:
            # A plain step: every model evaluates the pending token, one token is sampled.
            t0 = time.perf_counter()
            model_set.run(lambda b: b.eval([token]))
            t1 = time.perf_counter()
            token = sampler.sample(model_set.combined(mix), rng)
            t2 = time.perf_counter()
            stats.plain_steps += 1
            stats.verify_seconds += t1 - t0
            stats.combine_seconds += t2 - t1
            if tuner:
                k = tuner.update(t2 - t0, 1)
            yield token
            continue
        start = {b: len(b.tokens) for b in model_set.backends}

        # Draft: the tuned model samples from its own transformed distribution, restricted to
        # the shared ids so that every draft is a valid token for all models.
        t0 = time.perf_counter()
        drafter.eval([token])
        tuned_rows, q_rows, drafts = [], [], []
        for i in range(kk):
            lt = log_softmax(drafter.logits())
            own = log_softmax(lt[:n])
            if filter_drafts:
                # Draft from the filtered distribution too, so filtered-out drafts are not wasted.
                own = plausible(own, own, plaus.top_p, plaus.min_p)
            q = sampler.distribution(own)
            x = draw(q, rng) if not sampler.greedy else int(np.argmax(q))
            tuned_rows.append(lt)
            q_rows.append(q)
            drafts.append(x)
            if i < kk - 1:
                drafter.eval([x])
        t1 = time.perf_counter()

        # Verify: one batch per other model over the pending token and the drafts.
        model_set.run_on(verifiers, lambda b: b.eval([token, *drafts], n_logits=kk + 1))
        t2 = time.perf_counter()

        def target(i: int, tuned_row: np.ndarray) -> np.ndarray:
            rows = {drafter: tuned_row}
            rows.update({b: log_softmax(b.logits(i)) for b in verifiers})
            return sampler.distribution(model_set.combine_rows(rows, mix))

        accepted = 0
        new_token = None
        for i, x in enumerate(drafts):
            p = target(i, tuned_rows[i])
            q = q_rows[i]
            if rng.random() < min(1.0, float(np.exp(p[x] - q[x]))):
                accepted += 1
                continue
            new_token = draw(residual(p, q), rng)
            break
        if new_token is None:
            # All accepted: the bonus token needs the tuned model's row after the last draft.
            if kk:
                drafter.eval([drafts[-1]])
            new_token = draw(target(kk, log_softmax(drafter.logits())), rng)
        t3 = time.perf_counter()

        for b in model_set.backends:
            b.trim(start[b] + 1 + accepted)
        stats.rounds += 1
        stats.drafted += kk
        stats.accepted += accepted
        stats.draft_seconds += t1 - t0
        stats.verify_seconds += t2 - t1
        stats.combine_seconds += t3 - t2
        if tuner:
            k = tuner.update(t3 - t0, accepted + 1)

        yield from drafts[:accepted]
        token = new_token
        yield token
